"""flowmo-fast installs and imports like a library, from any folder (issue 21).

The import, start and distribution checks run where a user would: a subprocess of this Python whose working
folder is a temporary directory and whose PYTHONPATH is empty, so nothing is found through the repository root. With transformers 5 installed,
Hugging Face's `kernels` is on the path too: a top-level name of ours that some other distribution also
provides shadows one of the two (our old `kernels` package did).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Our top-level import names (what a wheel of flowmo-fast installs), and the top-level packages of the checkout
# that are not installed. A new top-level package must be put in one of the two (test_top_level_packages_known).
OURS = ("flowmo_fast", "flowmo_kernels", "train", "eval")
NOT_INSTALLED = ("bench", "tests")
DISTRIBUTION = "flowmo-fast"
# Commands the README has always listed; the README's own `-m` commands are added to these (readme_commands),
# so a command added to the README is checked without editing this file.
KNOWN_COMMANDS = (
    "train.pretrain", "train.posttrain", "eval.rfid", "eval.watch", "flowmo_fast.tokenize", "flowmo_fast.detokenize",
)


def readme_commands() -> list[str]:
    """Every `python -m` / `torchrun -m` module of ours the README names, plus KNOWN_COMMANDS."""
    pattern = rf"-m\s+((?:{'|'.join(OURS)})(?:\.\w+)+)"
    return sorted(set(re.findall(pattern, README.read_text())) | set(KNOWN_COMMANDS))


def run_elsewhere(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """This Python, run from `cwd` (outside the checkout) with an empty PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONPATH="", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def inside_checkout(path: str) -> bool:
    return Path(path).resolve().is_relative_to(ROOT)


def test_readme_commands_found():
    """The README scan finds the table's commands (else the tests below would check too little)."""
    found = set(re.findall(r"-m\s+([\w.]+)", README.read_text()))
    assert set(KNOWN_COMMANDS) <= found, f"README no longer names {sorted(set(KNOWN_COMMANDS) - found)}"


# Run outside the checkout: import each name, then start each command as `python -m COMMAND --help` does
# (runpy, as __main__, with that argv), all in one process so torch is imported once.
STARTUP_SCRIPT = """
import contextlib, importlib, io, json, runpy, sys, warnings
ours, names, commands = sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3].split(",")
imported, started = {}, {}
for name in names:
    try:
        imported[name] = importlib.import_module(name).__file__
    except Exception as e:
        imported[name] = f"ERROR {type(e).__name__}: {e}"
loaded = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items()) if n.split(".")[0] in ours}
warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules" (imported above)
for name in commands:
    out, argv = io.StringIO(), sys.argv
    sys.argv = [name, "--help"]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(name, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code
    except Exception as e:
        code = f"{type(e).__name__}: {e}"
    sys.argv = argv
    started[name] = {"exit": code, "usage": "usage:" in out.getvalue()}
print(json.dumps({"imported": imported, "loaded": loaded, "started": started}))
"""


@pytest.fixture(scope="module")
def startup(tmp_path_factory) -> dict:
    commands = readme_commands()
    args = [",".join(OURS), ",".join([*OURS, *commands]), ",".join(commands)]
    proc = run_elsewhere(["-c", STARTUP_SCRIPT, *args], tmp_path_factory.mktemp("elsewhere"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_packages_and_commands_import_from_elsewhere(startup):
    """`flowmo_fast`, `flowmo_kernels` and every command module import from a folder outside the checkout, and
    every module of our top-level names that got loaded is a file of this checkout (not a same-named package of
    another distribution)."""
    errors = {n: f for n, f in startup["imported"].items() if f is None or f.startswith("ERROR")}
    assert not errors, f"imports failing outside the checkout: {errors}"
    foreign = {n: f for n, f in startup["loaded"].items() if f is not None and not inside_checkout(f)}
    assert not foreign, f"modules of our top-level names loaded from outside {ROOT}: {foreign}"


def test_commands_start_from_elsewhere(startup):
    """`python -m COMMAND --help` starts, prints its usage and exits 0, from a folder outside the checkout."""
    failed = {n: r for n, r in startup["started"].items() if r != {"exit": 0, "usage": True}}
    assert not failed, f"commands that do not start outside the checkout: {failed}"


DISTRIBUTIONS_SCRIPT = """
import importlib.metadata, json, sys
found = importlib.metadata.packages_distributions()
print(json.dumps({name: found.get(name, []) for name in sys.argv[1:]}))
"""


def normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def test_each_top_level_name_has_one_distribution(tmp_path):
    """For each of our import names, the installed distributions that provide it are flowmo-fast only."""
    proc = run_elsewhere(["-c", DISTRIBUTIONS_SCRIPT, *OURS], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    providers = {name: sorted({normalized(d) for d in dists}) for name, dists in json.loads(proc.stdout).items()}
    wrong = {name: dists for name, dists in providers.items() if dists != [DISTRIBUTION]}
    assert not wrong, f"import names not provided by {DISTRIBUTION} alone (shadowing): {wrong}"


def top_level_packages(folder: Path) -> set[str]:
    return {p.parent.name for p in folder.glob("*/__init__.py")}


def test_top_level_packages_known():
    """Every top-level package of the checkout is either installed (OURS) or not (NOT_INSTALLED)."""
    assert top_level_packages(ROOT) - {*OURS, *NOT_INSTALLED} == set()
    assert set(OURS) <= top_level_packages(ROOT)


def python_files(folder: Path, packages) -> set[str]:
    """Paths relative to `folder` of every .py file under `packages` (no __pycache__)."""
    return {
        p.relative_to(folder).as_posix()
        for name in packages
        for p in (folder / name).rglob("*.py")
        if "__pycache__" not in p.parts
    }


def test_wheel_holds_every_python_file(tmp_path):
    """A wheel built from the checkout holds every .py file of our packages, and no other top-level package."""
    source = tmp_path / "src"  # a copy: building in place would write build/ and *.egg-info into the checkout
    source.mkdir()
    for name in top_level_packages(ROOT):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"pip wheel failed (needs setuptools>=70.1, in the test extra): {proc.stderr[-3000:]}"
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        members = {n for n in archive.namelist() if not n.split("/")[0].endswith((".dist-info", ".data"))}
    missing = python_files(ROOT, OURS) - members
    assert not missing, f"{wheel.name} lacks {sorted(missing)}"
    extra = {n.split("/")[0] for n in members} - set(OURS)
    assert not extra, f"{wheel.name} installs top-level names that are not ours to take: {sorted(extra)}"
