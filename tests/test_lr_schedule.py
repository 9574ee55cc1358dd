"""The learning-rate schedules (engine.optim.lr_multiplier): by hand, and against transformers' get_scheduler."""

import subprocess
import sys

import pytest
import torch

from rlhfkit.config import TrainConfig
from rlhfkit.engine.optim import build_scheduler, lr_multiplier


def test_schedules_by_hand():
    # warmup 2 of 10 steps: 0, 0.5, then the decay over the remaining 8 steps
    assert [lr_multiplier("constant", s, 2, 10) for s in (0, 1, 2, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert [lr_multiplier("linear", s, 2, 10) for s in (0, 1, 2, 6, 10, 12)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    assert lr_multiplier("cosine", 6, 2, 10) == pytest.approx(0.5)  # half-way: cos(pi/2)
    assert lr_multiplier("cosine", 10, 2, 10) == pytest.approx(0.0)
    assert lr_multiplier("cosine", 2, 2, 10) == 1.0
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        lr_multiplier("step", 3, 0, 10)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedules_equal_transformers(schedule, tmp_path):
    from transformers import get_scheduler

    def rates(make):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler = make(optimizer)
        out = []
        for _ in range(25):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out

    train = TrainConfig(output_dir=str(tmp_path), scheduler=schedule, warmup_steps=5, lr=0.1)
    ours = rates(lambda opt: build_scheduler(opt, train, 20))
    name = "constant_with_warmup" if schedule == "constant" else schedule
    theirs = rates(lambda opt: get_scheduler(name, opt, num_warmup_steps=5, num_training_steps=20))
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_the_trainers_do_not_import_peft_without_lora():
    """peft costs resident memory in every run; it is imported where LoRA is set up, not before."""
    code = ("import sys, rlhfkit.trainers.ppo, rlhfkit.trainers.dpo, rlhfkit.trainers.reward; "
            "print('peft' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"
