"""The package's layering (pyproject.toml's import-linter contract; README's Layout): imports point down only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "rlhfkit"


def _lint_imports(project: Path, source: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with ``project``'s pyproject.toml, importing rlhfkit from ``source``."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    command = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", command, "--no-cache", "--config", str(project / "pyproject.toml")],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _layer_modules() -> set[str]:
    config = _pyproject()["tool"]["importlinter"]
    (contract,) = config["contracts"]
    return {name.strip() for layer in contract["layers"] for name in layer.replace("|", ":").split(":")}


def test_every_module_of_the_package_has_a_layer():
    top_level = {f"rlhfkit.{p.stem}" for p in PACKAGE.iterdir()
                 if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert top_level == _layer_modules()


def test_the_package_keeps_its_layers():
    result = _lint_imports(ROOT, ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_import_against_the_layers_is_caught(tmp_path):
    # data/ importing the feedback store, as it once did: the lowest layer reaching up
    shutil.copytree(PACKAGE, tmp_path / "src" / "rlhfkit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    readers = tmp_path / "src" / "rlhfkit" / "data" / "readers.py"
    readers.write_text(readers.read_text(encoding="utf-8") + "\nfrom rlhfkit.feedback import store  # noqa\n",
                       encoding="utf-8")
    result = _lint_imports(tmp_path, tmp_path / "src")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "rlhfkit.data.readers -> rlhfkit.feedback.store" in result.stdout, result.stdout
