"""QLoRA (``model.quantization: 4bit``): 4-bit NF4 weights with LoRA adapters for SFT, the reward model, DPO and
PPO on this CPU (bitsandbytes' CPU backend), the plain model each final/ holds, and the errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhfkit.config import DPOConfig, ModelConfig, PPOConfig, RewardConfig, SFTConfig, load_config
from rlhfkit.data.readers import write_jsonl
from rlhfkit.models.load import load_causal_lm, save_model


def _bitsandbytes_missing() -> str | None:
    """Why 4-bit weights cannot be tested here (None: they can): bitsandbytes absent, or unable to quantise on
    this machine (its CPU backend needs a CPU it has kernels for)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'rlhfkit[qlora]')"
    try:
        import bitsandbytes.functional as functional

        functional.quantize_4bit(torch.randn(64, 64), quant_type="nf4")
    except Exception as error:  # noqa: BLE001 - any failure means: no 4-bit here
        return f"bitsandbytes cannot quantise to 4 bits on this machine: {error}"
    return None


_WHY_NO_4BIT = _bitsandbytes_missing()  # one trial quantisation per session
bitsandbytes = pytest.mark.skipif(_WHY_NO_4BIT is not None, reason=str(_WHY_NO_4BIT))
QLORA = {"quantization": "4bit", "lora": {"r": 4, "alpha": 8}}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_dir, task):
    """A tiny pretrained-looking model directory, and the data each stage reads."""
    directory = tmp_path_factory.mktemp("qlora")
    policy, tokenizer = load_causal_lm(ModelConfig(preset="tiny", tokenizer=str(tokenizer_dir)))
    save_model(policy, tokenizer, str(directory / "base"))
    prompts = task.prompts(16, seed=2)
    write_jsonl(directory / "sft.jsonl", task.demonstrations(prompts, seed=2))
    demos = [task.demonstrations([p, p], seed=i) for i, p in enumerate(prompts)]
    write_jsonl(directory / "pairs.jsonl", [{"prompt": a["prompt"], "chosen": a["completion"],
                                             "rejected": b["completion"] + " The end. The end."} for a, b in demos])
    write_jsonl(directory / "prompts.jsonl", [{"prompt": p} for p in prompts])
    return directory


def train_settings(directory, name, **more):
    return {"output_dir": str(directory / name), "max_steps": 2, "batch_size": 4, "lr": 1e-2, "log_every": 1,
            "progress": False, **more}


def is_4bit(module) -> bool:
    from bitsandbytes.nn import Linear4bit

    return any(isinstance(m, Linear4bit) for m in module.modules())


@bitsandbytes
def test_sft_trains_adapters_on_4bit_weights_and_saves_a_plain_model(base):
    from rlhfkit.trainers.sft import build_sft_trainer

    config = load_config(SFTConfig, base={"model": {"name_or_path": str(base / "base"), **QLORA},
                                          "data": {"train": str(base / "sft.jsonl"), "max_length": 64},
                                          "train": train_settings(base, "sft")})
    trainer = build_sft_trainer(config)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert is_4bit(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    metrics = trainer.train()
    assert metrics["loss"] == metrics["loss"]  # finite
    plain = AutoModelForCausalLM.from_pretrained(base / "sft" / "final")
    card = (base / "sft" / "final" / "README.md").read_text(encoding="utf-8")
    assert "- qlora" in card and "- lora" in card
    assert not is_4bit(plain) and getattr(plain.config, "quantization_config", None) is None
    ids = torch.randint(3, 500, (2, 12))
    model.eval()
    with torch.no_grad():  # the saved model is the trained one: de-quantised weights plus the adapters' delta
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@bitsandbytes
def test_reward_model_dpo_and_ppo_train_with_qlora(base):
    from rlhfkit.trainers.dpo import run_dpo
    from rlhfkit.trainers.ppo import PPOTrainer
    from rlhfkit.trainers.reward import build_reward_trainer

    rm = build_reward_trainer(load_config(RewardConfig, base={
        "model": {"name_or_path": str(base / "base"), **QLORA},
        "data": {"train": str(base / "pairs.jsonl"), "max_length": 64}, "train": train_settings(base, "rm")}))
    model = rm.trainer.accelerator.unwrap_model(rm.trainer.model)
    assert is_4bit(model)
    assert all(p.requires_grad for name, p in model.named_parameters() if "score" in name and "original" not in name)
    rm.train()
    scorer = AutoModelForSequenceClassification.from_pretrained(base / "rm" / "final")
    assert not is_4bit(scorer)
    ids = torch.randint(3, 500, (2, 12))
    model.eval()
    with torch.no_grad():  # the trained score head and adapters reach the saved model
        torch.testing.assert_close(scorer(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)

    metrics = run_dpo(load_config(DPOConfig, base={
        "model": {"name_or_path": str(base / "base"), **QLORA},
        "data": {"train": str(base / "pairs.jsonl"), "max_length": 64}, "train": train_settings(base, "dpo"),
        "dpo": {"beta": 0.1}}))  # the reference: the same 4-bit weights with the adapters disabled
    assert "rewards/margins" in metrics

    ppo = PPOTrainer(load_config(PPOConfig, base={
        "model": {"name_or_path": str(base / "base"), **QLORA},
        "data": {"train": str(base / "prompts.jsonl"), "max_length": 64},
        "train": train_settings(base, "ppo", max_steps=1),
        "ppo": {"reward_model": str(base / "rm" / "final"), "advantage": "grpo", "samples_per_prompt": 2,
                "rollout_batch_size": 4, "minibatch_size": 8, "ppo_epochs": 1, "max_new_tokens": 8}}))
    assert is_4bit(ppo.accelerator.unwrap_model(ppo.model))
    assert ppo.train()["rollout/sequences"] == 8
    assert not is_4bit(AutoModelForCausalLM.from_pretrained(base / "ppo" / "final"))


@pytest.mark.parametrize("model, message", [
    ({"name_or_path": "m", "quantization": "4bit"}, "trains LoRA adapters only"),
    ({"preset": "tiny", "tokenizer": "t", **QLORA}, "not a preset"),
    ({"name_or_path": "m.gguf", **QLORA}, "not a preset, not a .gguf file"),
])
def test_quantization_settings_are_checked(model, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**model)


def test_without_bitsandbytes_the_error_says_what_to_install(base, monkeypatch):
    from rlhfkit.models import load

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'rlhfkit\[qlora\]'"):
        load.load_causal_lm(ModelConfig(name_or_path=str(base / "base"), **QLORA))
