"""The engine knows no algorithm: it imports nothing of rlhfkit but the configs and itself; and the modules
that read a run's metrics need no trainer."""

import ast
from pathlib import Path

import rlhfkit

PACKAGE = Path(rlhfkit.__file__).parent


def rlhfkit_imports(path: Path) -> set[str]:
    """The rlhfkit modules ``path`` imports (at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlhfkit"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("rlhfkit")}
    return found


def test_the_engine_imports_only_the_configs_and_itself():
    for path in sorted((PACKAGE / "engine").glob("*.py")):
        outside = {name for name in rlhfkit_imports(path) if not name.startswith("rlhfkit.engine")}
        assert outside <= {"rlhfkit.config"}, (path.name, outside)


def test_the_report_reads_metrics_without_the_trainers():
    imported = rlhfkit_imports(PACKAGE / "evaluate" / "report.py")
    assert not {name for name in imported if name.startswith("rlhfkit.trainers")}
