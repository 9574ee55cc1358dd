"""The engine knows no algorithm: it imports nothing of rlhfkit but the configs and itself; the modules
that read a run's metrics need no trainer; and the engine's weight average (EMA) by hand."""

import ast
from pathlib import Path

import pytest
import torch

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


def test_weight_average_follows_the_trainable_weights_by_the_decay():
    from rlhfkit.engine.ema import WeightAverage

    module = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False))
    torch.nn.init.zeros_(module[0].weight)
    module[1].requires_grad_(False)  # frozen: not averaged
    average = WeightAverage(module, 0.9)
    assert list(average.state_dict()) == ["0.weight"]
    with torch.no_grad():
        module[0].weight.fill_(1.0)
    average.update(module)
    assert average.state_dict()["0.weight"].item() == pytest.approx(0.1)  # 0.9 * 0 + 0.1 * 1
    average.update(module)
    assert average.state_dict()["0.weight"].item() == pytest.approx(0.19)  # 0.9 * 0.1 + 0.1 * 1
    copy = average.averaged_copy(module)
    assert copy[0].weight.item() == pytest.approx(0.19) and module[0].weight.item() == 1.0
    assert torch.equal(copy[1].weight, module[1].weight)
    with pytest.raises(ValueError, match="1.weight"):
        average.load_state_dict({"1.weight": torch.zeros(1, 1)})
    with pytest.raises(ValueError, match=r"lies in \(0, 1\)"):
        WeightAverage(module, 1.0)
