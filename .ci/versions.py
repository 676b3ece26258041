"""Print the releases this environment resolved for flowmo-fast's direct dependencies (and the test extra).

CI prints this before the tests, so a failure caused by a new release of a dependency shows at once in the log.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

# Installed beside us by a dependency and known to matter (Hugging Face's `kernels` took our old import name).
ALSO = ("triton", "kernels", "setuptools", "pip")


def direct_dependencies(dist: str = "flowmo-fast") -> list[str]:
    """Names in the distribution's requirements whose markers hold here (the test extra included)."""
    names = []
    for req in metadata.requires(dist) or []:
        name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
        marker = req.split(";", 1)[1] if ";" in req else ""
        if "extra ==" in marker and "'test'" not in marker and '"test"' not in marker:
            continue
        if name not in names:
            names.append(name)
    return names


def main() -> None:
    print(f"ci: python {sys.version.split()[0]} at {sys.executable}")
    for name in direct_dependencies() + [n for n in ALSO if n not in direct_dependencies()]:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"ci: {name:<18} {version}")


if __name__ == "__main__":
    main()
