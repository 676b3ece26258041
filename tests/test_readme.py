"""The README's Python example runs as written (on the tiny checkpoint instead of a published one)."""

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_readme_python_example_runs(tiny_checkpoint, capsys):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    code, n = re.subn(r'^CKPT = .*$', f"CKPT = {str(tiny_checkpoint)!r}", code, flags=re.M)
    assert n == 1
    code = code.replace("steps=25", "steps=3")  # keep the test fast; same code path
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([1, 32]) torch.Size([1, 3, 32, 32]) True True" in out


def test_readme_commands_are_the_ci_commands():
    """CI is a new user: the README's test command, run by a new virtual environment's Python."""
    readme = README.read_text()
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]" && python -m pytest' in readme
    assert re.search(r'^python3 -m venv "\$WORK/venv"$', ci, re.M)
    assert re.search(r'^"\$PY" -m pip install -q -e "\.\[test\]"$', ci, re.M)
    assert re.search(r'^"\$PY" -m pytest\b', ci, re.M)


def test_readme_main_job_is_the_tested_demo_preset():
    """The main job runs the `demo` preset as it stands (tests/train/test_train_demo.py checks that it learns)."""
    job = re.search(r"^pip install -e \. && (python -m train\.pretrain .*)$", README.read_text(), re.M).group(1)
    assert job.split() == ["python", "-m", "train.pretrain", "--preset", "demo", "--experiment-name", "demo"]
    assert "docs/demo_grid.png" in README.read_text() and (README.parent / "docs" / "demo_grid.png").stat().st_size < 100_000


def layout_section() -> str:
    text = README.read_text()
    return text[text.index("## Layout\n"):]


def test_readme_layout_lists_every_subpackage_and_command():
    """The Layout section names every package folder (`flowmo_fast/flowmo/`, ...) and every command module (one
    with a `main` run under `__main__`), so a new room or command cannot go unmentioned."""
    root = README.parent
    layout = layout_section()
    missing = []
    for package in ("flowmo_kernels", "flowmo_fast", "train", "eval", "bench"):
        for init in (root / package).rglob("__init__.py"):
            folder = init.parent.relative_to(root).as_posix() + "/"
            if f"`{folder}`" not in layout:
                missing.append(folder)
        for path in (root / package).rglob("*.py"):
            text = path.read_text()
            if re.search(r"^def main\(", text, re.M) and '__name__ == "__main__"' in text:
                if f"`{path.relative_to(root).as_posix()}`" not in layout:
                    missing.append(path.relative_to(root).as_posix())
    assert missing == [], f"not in the README's Layout section: {missing}"


def test_readme_sharing_example_runs(tokenizer_run_checkpoint, generator_run_checkpoint, tmp_path, monkeypatch, capsys):
    """The "Sharing models" example, on the tiny tokenizer's checkpoint and the tiny generator's run folder."""
    text = README.read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("## Sharing models\n"):], re.S).group(1)
    code, n = re.subn(r'^CKPT = .*$', f"CKPT = {str(tokenizer_run_checkpoint)!r}", code, flags=re.M)
    code, m = re.subn(r'^GEN = .*$', f"GEN = {str(generator_run_checkpoint.parent.parent)!r}", code, flags=re.M)
    assert n == m == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.split() == ["512", "512", "150"]
    files = sorted(p.name for p in (tmp_path / "my-flowmo").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"]
