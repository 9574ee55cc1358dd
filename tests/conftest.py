"""Shared fixtures: a tokenizer trained on the built-in task's text and tiny models built from it."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.models.build import build_causal_lm
from rlhfkit.models.tokenizer import train_bpe_tokenizer
from rlhfkit.tasks import get_task


@pytest.fixture(scope="session")
def task():
    return get_task("tinyworld")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, task):
    """A 512-token BPE tokenizer trained on the task's corpus and demonstrations (saved in HF format)."""
    directory = tmp_path_factory.mktemp("tokenizer")
    demos = task.demonstrations(task.prompts(300, seed=0), seed=0)
    texts = task.pretraining_corpus(300, seed=0) + [d["prompt"] for d in demos] + [d["completion"] for d in demos]
    train_bpe_tokenizer(texts, vocab_size=512, save_dir=directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from rlhfkit.models.load import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The embedded default (``rlhfkit demo``), shared by the end-to-end tests (about eight minutes, once).

    Only the evaluation is larger (800 held-out prompts instead of 400, and a best-of-16 row of SFT), so
    that the gold-judge comparisons of SFT, PPO and DPO are less noisy. The directory holds ``data/`` (task corpus,
    demonstrations, prompts), ``tokenizer/``, ``pretrain/final``, ``sft/final``, ``sample/`` and ``rank/``
    (the SFT samples and their rankings), ``rm/final``, ``ppo/`` and ``dpo/`` (with their half-way
    checkpoints), ``samples/``, ``summary.json``, ``report.html`` and ``illustration.svg`` / ``.png``.
    """
    from rlhfkit.demo import DemoConfig, run_demo

    out = tmp_path_factory.mktemp("demo")
    config = DemoConfig(out_dir=str(out), eval_prompts=800, best_of_n=16)
    run_demo(config)
    return out


@pytest.fixture
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return build_causal_lm(tokenizer, "tiny", seed=0)


@pytest.fixture(scope="module")
def ppo_setup(tmp_path_factory, tokenizer_dir, task):
    """A tiny random policy, a reward model initialised from it, and train prompts (for the PPO tests)."""
    from rlhfkit.config import ModelConfig
    from rlhfkit.data.readers import write_jsonl
    from rlhfkit.models.load import load_causal_lm, save_model
    from rlhfkit.models.reward import load_reward_model

    directory = tmp_path_factory.mktemp("ppo")
    policy, tokenizer = load_causal_lm(ModelConfig(preset="tiny", tokenizer=str(tokenizer_dir)))
    save_model(policy, tokenizer, str(directory / "policy"))
    reward, reward_tokenizer = load_reward_model(ModelConfig(name_or_path=str(directory / "policy")))
    save_model(reward, reward_tokenizer, str(directory / "rm"))
    write_jsonl(directory / "prompts.jsonl", [{"prompt": p} for p in task.prompts(32, seed=0)])
    write_jsonl(directory / "corpus.jsonl", [{"text": t} for t in task.pretraining_corpus(40, seed=0)])
    return directory
