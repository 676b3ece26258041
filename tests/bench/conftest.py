"""The benchmark helpers live in the repository's `bench` package, which is not installed: put the
repository root first on sys.path so `import bench` finds it (and not this folder)."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
