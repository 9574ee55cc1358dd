"""The DPO trainer: layouts, references, precomputed log-probs, data handling, bad records, gold gain."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from rlhfkit import cli
from rlhfkit.config import ConfigError, DPOConfig, load_config
from rlhfkit.data.readers import write_jsonl
from rlhfkit.data.records import LabeledRecord, parse_record
from rlhfkit.engine.checkpoint import checkpoints
from rlhfkit.engine.metrics import read_metrics
from rlhfkit.trainers import dpo as dpo_module
from rlhfkit.trainers.dpo import (
    PreferenceCollator,
    Reference,
    build_dpo_trainer,
    labeled_completions,
    response_logps,
)

DPO_METRICS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected"}


@pytest.fixture(scope="module")
def preference_files(tmp_path_factory, task):
    """Pairs and 3-way rankings of mixed-quality demonstrations, ranked by the simulated labeler."""
    directory = tmp_path_factory.mktemp("dpo-data")
    rng = random.Random(0)
    rankings, pairs = [], []
    for prompt in task.prompts(48, seed=3):
        completions = [d["completion"] for d in task.demonstrations([prompt] * 3, seed=rng.randrange(10**6))]
        groups = task.rank(prompt, completions, rng=rng)
        if len(groups) < 2:
            continue
        rankings.append({"prompt": prompt, "completions": completions, "ranking": groups})
        best, worst = groups[0][0], groups[-1][0]
        pairs.append({"prompt": prompt, "chosen": completions[best], "rejected": completions[worst]})
    write_jsonl(directory / "rankings.jsonl", rankings)
    write_jsonl(directory / "pairs.jsonl", pairs)
    write_jsonl(directory / "eval.jsonl", pairs[:12])
    return directory


def dpo_config(tmp_path, tokenizer_dir, files, name="run", data="pairs.jsonl", dpo=None, model=None, **train):
    return load_config(DPOConfig, base={
        "model": {"preset": "tiny", "tokenizer": str(tokenizer_dir), **(model or {})},
        "data": {"train": str(files / data), "eval": str(files / "eval.jsonl"), "max_length": 96},
        "train": {"output_dir": str(tmp_path / name), "batch_size": 4, "lr": 3e-3, "warmup_steps": 0,
                  "max_steps": 4, "log_every": 2, "progress": False, **train},
        "dpo": dpo or {}})


def first_batch(trainer, n=4):
    batch = trainer.collator(trainer.train_examples[:n])
    return {k: v.to(trainer.accelerator.device) for k, v in batch.items()}


# ---- the loss through the real forward ---------------------------------------------------------------


@pytest.mark.parametrize("reference, share", [("copy", True), ("copy", False), ("adapters", True)])
def test_dpo_loss_at_initialisation_is_log_two(tmp_path, tokenizer_dir, preference_files, reference, share):
    lora = {"lora": {"r": 4}} if reference == "adapters" else None
    trainer = build_dpo_trainer(dpo_config(tmp_path, tokenizer_dir, preference_files, data="rankings.jsonl",
                                           dpo={"reference": reference, "share_prompt": share}, model=lora))
    trainer.model.train()
    loss, n_pairs, metrics = trainer.loss_fn(trainer.model, first_batch(trainer))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert n_pairs.item() >= 4  # rankings: several pairs per example
    assert metrics["rewards/chosen"] == metrics["rewards/rejected"] == metrics["rewards/margins"] == 0
    assert metrics["logps/chosen"] < 0


def test_shared_prompt_rows_score_like_one_sequence_at_a_time(tmp_path, tokenizer_dir, preference_files):
    """Shared-prompt rows, the concatenated left-padded batch, eager attention and every sequence alone agree."""
    trainer = build_dpo_trainer(dpo_config(tmp_path, tokenizer_dir, preference_files, data="rankings.jsonl"))
    model, examples = trainer.model.eval(), trainer.train_examples[:5]
    pad = trainer.tokenizer.pad_token_id
    with torch.no_grad():
        shared, n_shared = response_logps(model, PreferenceCollator(pad, share_prompt=True)(examples))
        rows, n_rows = response_logps(model, PreferenceCollator(pad, share_prompt=False)(examples))
        alone = torch.cat([response_logps(model, PreferenceCollator(pad, share_prompt=False)(
            [dpo_module.PreferenceExample(e.prompt, (r,))]))[0] for e in examples for r in e.responses])
        model.set_attn_implementation("eager")
        eager, _ = response_logps(model, PreferenceCollator(pad, share_prompt=True)(examples))
    assert n_shared.tolist() == n_rows.tolist() == [len(r) for e in examples for r in e.responses]
    torch.testing.assert_close(shared, alone, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(rows, alone, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(eager, alone, atol=2e-4, rtol=1e-5)


def test_lora_reference_equals_a_frozen_copy(tmp_path, tokenizer_dir, preference_files):
    trainer = build_dpo_trainer(dpo_config(tmp_path, tokenizer_dir, preference_files, model={"lora": {"r": 4}}))
    policy = trainer.model
    frozen = Reference(copy.deepcopy(policy.get_base_model()))  # the base weights, before any adapter update
    with torch.no_grad():  # move the policy away from the base: adapters now matter
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    batch = first_batch(trainer)
    with torch.no_grad():
        through_adapters = Reference(adapters=True).logps(policy, batch)
        through_copy = frozen.logps(policy, batch)
        policy_logps = response_logps(policy, batch)[0]
    torch.testing.assert_close(through_adapters, through_copy, atol=1e-5, rtol=1e-6)
    assert (policy_logps - through_copy).abs().max() > 1.0
    assert trainer.loss_fn.reference.adapters and trainer.loss_fn.reference.module is None  # no second copy


def test_precomputed_reference_gives_the_same_training(tmp_path, tokenizer_dir, preference_files, monkeypatch):
    runs = {}
    for name, precompute in (("live", False), ("cached", True)):
        config = dpo_config(tmp_path, tokenizer_dir, preference_files, name, data="rankings.jsonl",
                            dpo={"precompute_reference": precompute}, max_steps=6, eval_every=6)
        trainer = build_dpo_trainer(config)
        assert (trainer.loss_fn.reference is None) == precompute  # no reference kept once precomputed
        trainer.train()
        runs[name] = [r for r in read_metrics(tmp_path / name) if "loss" in r or "eval/loss" in r]
    assert (tmp_path / "cached" / dpo_module.REFERENCE_CACHE).exists()
    for live, cached in zip(runs["live"], runs["cached"], strict=True):
        for key in ("loss", "rewards/margins", "eval/loss", "eval/rewards/margins"):
            if key in live:
                assert cached[key] == pytest.approx(live[key], rel=1e-4, abs=1e-5), (key, live, cached)
    # a rebuild reads the cache instead of scoring the data again
    monkeypatch.setattr(dpo_module, "compute_reference_logps", lambda *a, **k: pytest.fail("recomputed"))
    config = dpo_config(tmp_path, tokenizer_dir, preference_files, "cached", data="rankings.jsonl",
                        dpo={"precompute_reference": True})
    assert build_dpo_trainer(config).train_examples[0].ref_logps is not None


def test_precomputed_reference_with_lora_and_a_separate_reference_model(tmp_path, tokenizer_dir, preference_files):
    lora = build_dpo_trainer(dpo_config(tmp_path, tokenizer_dir, preference_files, "lora", model={"lora": {"r": 4}},
                                        dpo={"precompute_reference": True}))
    loss, _, _ = lora.loss_fn(lora.model, first_batch(lora))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    # a different model as the reference: the loss starts away from log 2
    other = build_dpo_trainer(dpo_config(tmp_path, tokenizer_dir, preference_files, "other")).model
    other.save_pretrained(tmp_path / "other-model")
    lora.tokenizer.save_pretrained(tmp_path / "other-model")
    trainer = build_dpo_trainer(dpo_config(tmp_path, tokenizer_dir, preference_files, "ref-model",
                                           dpo={"reference_model": str(tmp_path / "other-model")}, seed=5))
    loss, _, _ = trainer.loss_fn(trainer.model, first_batch(trainer))
    assert abs(loss.item() - math.log(2)) > 1e-3


# ---- data -----------------------------------------------------------------------------------------------


def test_rankings_train_on_their_non_tied_pairs(tmp_path, tokenizer_dir):
    rows = [{"prompt": "List three fruits.", "completions": ["Apple, pear and plum.", "Apple.", "Pear.", "Kiwi."],
             "ranking": [[0], [1, 3], [2]]},  # ties 1 and 3: 5 pairs, not 6
            {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}]
    write_jsonl(tmp_path / "r.jsonl", rows)
    config = load_config(DPOConfig, base={
        "model": {"preset": "tiny", "tokenizer": str(tokenizer_dir)}, "data": {"train": str(tmp_path / "r.jsonl")},
        "train": {"output_dir": str(tmp_path / "run"), "progress": False}})
    trainer = build_dpo_trainer(config)
    first, second = trainer.train_examples
    assert first.pairs == ((0, 1), (0, 3), (0, 2), (1, 2), (3, 2)) and len(first.responses) == 4
    assert second.pairs == ((0, 1),) and len(second.responses) == 2
    _, units, _ = trainer.loss_fn(trainer.model, trainer.collator([first, second]))
    assert units.item() == 6


def test_kto_labels_from_rankings_and_unpaired_records():
    ranking = parse_record({"prompt": "p", "completions": ["a", "b", "c", "d", "e"], "ranking": [0, 1, 2, 3, 4]},
                           "labeled")
    labeled = parse_record({"prompt": "q", "completion": "x", "label": False}, "labeled")
    assert labeled == LabeledRecord("q", "x", False)
    assert labeled_completions([ranking, labeled]) == [("p", "a", True), ("p", "b", True), ("p", "d", False),
                                                       ("p", "e", False), ("q", "x", False)]
    pair = parse_record({"prompt": "p", "chosen": "good", "rejected": "bad"}, "labeled")
    assert labeled_completions([pair]) == [("p", "good", True), ("p", "bad", False)]


def test_kto_trains_on_unpaired_records(tmp_path, tokenizer_dir, preference_files, task):
    rows = [{"prompt": p, "completion": d["completion"], "label": task.gold_score(p, d["completion"]) > 0.5}
            for p, d in zip(task.prompts(24, seed=4), task.demonstrations(task.prompts(24, seed=4), seed=4),
                            strict=True)]
    write_jsonl(tmp_path / "unpaired.jsonl", rows)
    config = dpo_config(tmp_path, tokenizer_dir, preference_files, dpo={"loss": "kto"})
    config.data.train = str(tmp_path / "unpaired.jsonl")
    trainer = build_dpo_trainer(config)
    example = trainer.train_examples[0]
    assert len(example.responses) == 2 and example.desirable is not None
    loss, _, metrics = trainer.loss_fn(trainer.model, first_batch(trainer, 8))
    assert loss.item() == pytest.approx(0.5, abs=1e-5) and metrics["kl"] == 0  # policy == reference
    trainer.train()
    assert {"loss", "kl", "rewards/chosen", "rewards/rejected"} <= set(read_metrics(tmp_path / "run")[1])


def test_dpo_and_kto_train_on_trl_files_as_they_are(tmp_path, tokenizer_dir, preference_files):
    """TRL's conversational preference with an implicit prompt (DPO) and unpaired preference (KTO), without
    convert-data."""
    pairs = [json.loads(line) for line in (preference_files / "pairs.jsonl").read_text().splitlines()]

    def user(text):
        return [{"role": "user", "content": text}]

    def assistant(text):
        return [{"role": "assistant", "content": text}]

    write_jsonl(tmp_path / "trl_pairs.jsonl", [
        {"chosen": user(r["prompt"]) + assistant(r["chosen"]), "rejected": user(r["prompt"]) + assistant(r["rejected"])}
        for r in pairs])
    write_jsonl(tmp_path / "trl_unpaired.jsonl", [
        {"prompt": user(r["prompt"]), "completion": assistant(r[side]), "label": side == "chosen"}
        for r in pairs for side in ("chosen", "rejected")])
    for data, loss in (("trl_pairs.jsonl", "dpo"), ("trl_unpaired.jsonl", "kto")):
        config = dpo_config(tmp_path, tokenizer_dir, tmp_path, name=loss, data=data, dpo={"loss": loss}, max_steps=2)
        config.data.eval = None
        trainer = build_dpo_trainer(config)
        assert len(trainer.train_examples) == len(pairs) * (1 if loss == "dpo" else 2)
        assert math.isfinite(trainer.train()["loss"])


# ---- training runs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [
    {"loss": "dpo", "label_smoothing": 0.1}, {"loss": "ipo"}, {"loss": "robust", "label_smoothing": 0.2},
    {"loss": "hinge"}, {"loss": "orpo"}, {"loss": "kto"}, {"loss": "dpo", "reference": "none"},
    {"loss": "dpo", "share_prompt": False}, {"loss": "simpo", "beta": 2.0}, {"loss": "dpo", "rpo_alpha": 1.0},
])
def test_every_loss_trains_and_logs_the_dpo_metrics(tmp_path, tokenizer_dir, preference_files, settings):
    config = dpo_config(tmp_path, tokenizer_dir, preference_files, data="rankings.jsonl", dpo=settings,
                        max_steps=6, eval_every=6, lr=1e-2)
    metrics = build_dpo_trainer(config).train()
    records = read_metrics(tmp_path / "run")
    train_logs = [r for r in records if "loss" in r]
    expected = {"loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"}
    if settings["loss"] != "kto":
        expected |= {"rewards/accuracies", "rewards/margins"}
    if "rpo_alpha" in settings:
        expected.add("nll_loss")
    assert expected <= set(train_logs[-1]) and "ppl" not in train_logs[-1]
    assert {f"eval/{k}" for k in expected} <= set(metrics)
    assert all(math.isfinite(r["loss"]) for r in train_logs)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("settings", [{"loss": "dpo"}, {"loss": "ipo", "beta": 1.0},
                                      {"loss": "robust", "label_smoothing": 0.2}, {"loss": "hinge"}])
def test_training_learns_the_preferences(tmp_path, tokenizer_dir, preference_files, settings):
    """On the pairs it trains on, the loss falls and the implicit reward comes to prefer the chosen response."""
    config = dpo_config(tmp_path, tokenizer_dir, preference_files, dpo=settings, max_steps=12, eval_every=12,
                        lr=1e-2)
    config.data.eval = str(preference_files / "eval.jsonl")
    config.data.train = str(preference_files / "eval.jsonl")
    build_dpo_trainer(config).train()
    records = [r for r in read_metrics(tmp_path / "run") if "eval/loss" in r]
    assert records[-1]["eval/loss"] < records[0]["eval/loss"] - 0.05 * abs(records[0]["eval/loss"])
    assert records[-1]["eval/rewards/accuracies"] >= 0.75
    assert records[-1]["eval/rewards/margins"] > 0


class Interrupt(Exception):
    pass


def test_resume_keeps_the_initial_policy_as_reference(tmp_path, tokenizer_dir, preference_files):
    straight = dpo_config(tmp_path, tokenizer_dir, preference_files, "straight", max_steps=6, save_every=3,
                          log_every=1)
    build_dpo_trainer(straight).train()
    resumed = dpo_config(tmp_path, tokenizer_dir, preference_files, "resumed", max_steps=6, save_every=3,
                         log_every=1)
    trainer = build_dpo_trainer(resumed)
    real, calls = trainer.loss_fn, {"n": 0}

    def dies_in_step_five(model, batch):
        calls["n"] += model.training
        if calls["n"] == 5:
            raise Interrupt
        return real(model, batch)

    trainer.loss_fn = dies_in_step_five
    with pytest.raises(Interrupt):
        trainer.train()
    assert [p.name for p in checkpoints(tmp_path / "resumed")] == ["checkpoint-3"]
    build_dpo_trainer(resumed).train()
    a, b = (read_metrics(tmp_path / name) for name in ("straight", "resumed"))
    assert [r["loss"] for r in a if "loss" in r] == pytest.approx([r["loss"] for r in b if "loss" in r], rel=1e-5)
    assert [r["step"] for r in b if "loss" in r] == [1, 2, 3, 4, 5, 6]
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / name / "final").state_dict()
            for name in ("straight", "resumed"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


# ---- config and bad records -------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("dpo.loss=ipo", "dpo.label_smoothing applies to losses dpo and robust"),
    ("dpo.reference=adapters", "dpo.reference adapters needs model.lora"),
    ("dpo.loss=cpo", "dpo.loss"),
    ("dpo.bta=0.1", "unknown key"),
    ("dpo.loss=simpo", "dpo.precompute_reference needs a reference model"),
    ("dpo.loss=kto", "dpo.rpo_alpha adds the chosen response's NLL to a pairwise loss; not to dpo.loss kto"),
])
def test_bad_dpo_settings_name_the_key(tmp_path, override, message):
    overrides = ["model.preset=tiny", "model.tokenizer=t", "data.train=x.jsonl", f"train.output_dir={tmp_path}",
                 override]
    extra = {"dpo.loss=ipo": "dpo.label_smoothing=0.1", "dpo.loss=simpo": "dpo.precompute_reference=true",
             "dpo.loss=kto": "dpo.rpo_alpha=1.0"}
    if override in extra:
        overrides.append(extra[override])
    with pytest.raises(ConfigError, match=message):
        load_config(DPOConfig, None, overrides)


GOOD = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}


@pytest.mark.parametrize("bad, field, message", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "is identical to 'chosen'"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "chosen", "is empty"),
    ({"prompt": "p", "chosen": "a", "rejected": ""}, "rejected", "is empty"),
    ({"chosen": "a", "rejected": "b"}, "prompt", "is missing"),
    ({"prompt": "p", "completions": ["a", "b", "a"], "ranking": [0, 1, 2]}, "ranking",
     "completions 0 and 2 are identical but ranked apart"),
    ({"prompt": "p", "completions": ["a", "b"], "ranking": [[0, 1]]}, "ranking", "ties every completion"),
    ({"prompt": "p", "completion": "a", "label": "yes"}, "label", "expected true (desirable) or false"),
])
def test_bad_records_stop_dpo_with_file_line_and_field(tmp_path, tokenizer_dir, monkeypatch, bad, field, message):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(bad) + "\n", encoding="utf-8")
    monkeypatch.setattr(cli.console, "width", 1000)  # one line per message
    loss = "kto" if "label" in bad else "dpo"
    result = CliRunner().invoke(cli.app, ["dpo", "--set", "model.preset=tiny", "--set",
                                          f"model.tokenizer={tokenizer_dir}", "--set", f"data.train={path}",
                                          "--set", f"train.output_dir={tmp_path / 'run'}", "--set", f"dpo.loss={loss}"])
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 2, output
    assert f"{path}, line 3, field '{field}': {message}" in output
    assert not (tmp_path / "run" / "final").exists()


# ---- the gold judge --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dpo_beats_sft_on_the_gold_judge(demo_run):
    """The demo's DPO stage: SFT -> 4 samples for 2000 train prompts -> the simulated labeler ranks -> DPO.

    The labeler is the task's default (noisy Plackett-Luce with a length bias; ~72% agreement with gold on
    these samples). DPO must stay close to SFT here: at beta 0.1 and lr 1e-4 the policy drifts longer and
    loses gold (0.360 -> 0.328 with 400 steps). Measured with the demo's settings (beta 0.3, lr 3e-5, 400
    steps of 16 pairs): SFT 0.360, DPO 0.391 on 400 held-out prompts, two sampling seeds.
    """
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["eval_prompts"] == 800
    sft, dpo = summary["models"]["sft"], summary["models"]["dpo"]
    assert dpo["gold/score"] > sft["gold/score"] + 0.005, summary
    assert read_metrics(demo_run / "dpo")[-1]["rewards/accuracies"] > 0.55
