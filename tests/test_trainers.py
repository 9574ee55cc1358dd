import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhfkit.config import SFTConfig, load_config
from rlhfkit.data.readers import write_jsonl
from rlhfkit.engine.checkpoint import checkpoints
from rlhfkit.engine.compile import compile_repeated_blocks
from rlhfkit.engine.errors import TrainingError
from rlhfkit.engine.guard import NONFINITE_FILE
from rlhfkit.engine.metrics import read_metrics
from rlhfkit.trainers.base import epoch_order
from rlhfkit.trainers.sft import build_sft_trainer


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory, task):
    directory = tmp_path_factory.mktemp("sft-data")
    write_jsonl(directory / "train.jsonl", task.demonstrations(task.prompts(64, seed=1), seed=1))
    write_jsonl(directory / "eval.jsonl", task.demonstrations(task.prompts(16, split="test", seed=1), seed=1))
    return directory


def sft_config(tmp_path, tokenizer_dir, demo_files, name, **train):
    return load_config(SFTConfig, base={
        "model": {"preset": "tiny", "tokenizer": str(tokenizer_dir)},
        "data": {"train": str(demo_files / "train.jsonl"), "eval": str(demo_files / "eval.jsonl"),
                 "max_length": 96, "max_prompt_length": 48},
        "train": {"output_dir": str(tmp_path / name), "batch_size": 8, "lr": 3e-3, "warmup_steps": 2,
                  "max_steps": 8, "log_every": 2, "progress": False, **train}})


def final_weights(run_dir):
    return AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()


def test_run_directory_layout(tmp_path, tokenizer_dir, demo_files):
    config = sft_config(tmp_path, tokenizer_dir, demo_files, "run", save_every=4, save_total_limit=1)
    metrics = build_sft_trainer(config).train()
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and (run / "final" / "model.safetensors").exists()
    assert [p.name for p in checkpoints(run)] == ["checkpoint-8"]  # only the newest kept
    records = read_metrics(run)
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8]
    assert records[0]["step"] == 0 and "eval/loss" in records[0]
    assert {"loss", "ppl", "lr", "grad_norm", "tokens_per_s"} <= set(records[1])
    assert records[1]["learning_rate"] == records[1]["lr"]  # TRL's name of the same quantity
    assert records[-1]["eval/ppl"] == pytest.approx(torch.tensor(records[-1]["eval/loss"]).exp().item())
    assert metrics["eval/loss"] == records[-1]["eval/loss"]


def test_eval_at_start_off_skips_only_the_step_0_evaluation(tmp_path, tokenizer_dir, demo_files):
    config = sft_config(tmp_path, tokenizer_dir, demo_files, "run", max_steps=4, eval_every=2, eval_at_start=False)
    metrics = build_sft_trainer(config).train()
    evaluated = [r["step"] for r in read_metrics(tmp_path / "run") if "eval/loss" in r]
    assert evaluated == [2, 4, 4]  # eval_every, then the final evaluation; none at step 0
    assert "eval/loss" in metrics


def test_eval_every_need_not_be_a_multiple_of_log_every(tmp_path, tokenizer_dir, demo_files):
    config = sft_config(tmp_path, tokenizer_dir, demo_files, "run", max_steps=6, log_every=4, eval_every=3,
                        eval_at_start=False)
    build_sft_trainer(config).train()
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if "eval/loss" in r] == [3, 6, 6]  # step 3 is no log step
    assert [r["step"] for r in records if "loss" in r] == [4, 6]
    assert "loss" not in next(r for r in records if r["step"] == 3)  # an evaluation of its own


@pytest.mark.parametrize("average", ["batch", "dataset"])
def test_sft_averages_the_loss_per_batch_or_over_the_training_set(tmp_path, tokenizer_dir, demo_files, average):
    """``sft.loss_average: dataset`` scales each micro-batch's mean loss by its target tokens over the training
    set's mean per micro-batch: the loss summed over an epoch is the mean over all its tokens, not a mean of
    per-batch means, which favours the tokens of short, length-grouped batches (``batch``, the default)."""
    config = sft_config(tmp_path, tokenizer_dir, demo_files, "run", group_by_length=True)
    trainer = build_sft_trainer(load_config(SFTConfig, None, [f"sft.loss_average={average}"], base=config.model_dump()))
    examples = trainer.train_examples
    per_batch = sum(sum(e.loss_mask[1:]) for e in examples) * 8 / len(examples)  # batch_size 8
    weights, tokens = [], []

    def capture(micro_batches, loss, positions):
        for micro in micro_batches:
            backpropagated, value = loss(micro)
            weights.append(backpropagated.item() / value)
            tokens.append(micro[1]["loss_mask"][:, 1:].sum().item())
        return 0.0

    trainer.optimizer_step = capture
    for index in range(trainer.n_batches):  # one epoch: 64 examples, 8 full micro-batches
        trainer._optimizer_step([trainer._micro_batch(index)])
    assert max(tokens) > 1.2 * min(tokens)  # grouped by length: the batches' token counts differ
    if average == "batch":
        assert weights == [1.0] * trainer.n_batches
    else:
        assert weights == pytest.approx([n / per_batch for n in tokens], rel=1e-5)
        assert sum(weights) == pytest.approx(trainer.n_batches, rel=1e-5)  # on average the learning rate is unchanged


def test_training_lowers_held_out_loss(tmp_path, tokenizer_dir, demo_files):
    trainer = build_sft_trainer(sft_config(tmp_path, tokenizer_dir, demo_files, "run", max_steps=30))
    before = trainer.evaluate()["eval/loss"]
    after = trainer.train()["eval/loss"]
    assert after < before - 1.0, (before, after)


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted_run(tmp_path, tokenizer_dir, demo_files):
    straight = sft_config(tmp_path, tokenizer_dir, demo_files, "straight", grad_accum=2, save_every=4)
    build_sft_trainer(straight).train()

    resumed = sft_config(tmp_path, tokenizer_dir, demo_files, "resumed", grad_accum=2, save_every=4)
    trainer = build_sft_trainer(resumed)
    calls = {"n": 0}
    real_loss = trainer.loss_fn

    def dies_in_step_six(model, batch):  # 2 micro-batches per step: call 11 is in step 6
        calls["n"] += model.training  # evaluation batches do not count
        if calls["n"] == 11:
            raise Interrupt
        return real_loss(model, batch)

    trainer.loss_fn = dies_in_step_six
    with pytest.raises(Interrupt):
        trainer.train()
    assert [p.name for p in checkpoints(tmp_path / "resumed")] == ["checkpoint-4"]

    build_sft_trainer(resumed).train()  # a fresh process would do exactly this
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed") if "loss" in r]
    assert steps == [2, 4, 6, 8]  # the dead run's records past the checkpoint were dropped


def test_a_run_restarted_before_its_first_checkpoint_logs_every_step_once(tmp_path, tokenizer_dir, demo_files):
    config = sft_config(tmp_path, tokenizer_dir, demo_files, "restart", save_every=6)
    trainer = build_sft_trainer(config)
    real_loss, calls = trainer.loss_fn, {"n": 0}

    def dies_in_step_five(model, batch):
        calls["n"] += model.training  # evaluation batches do not count
        if calls["n"] == 5:
            raise Interrupt
        return real_loss(model, batch)

    trainer.loss_fn = dies_in_step_five
    with pytest.raises(Interrupt):
        trainer.train()
    assert not checkpoints(tmp_path / "restart")
    assert [r["step"] for r in read_metrics(tmp_path / "restart")] == [0, 2, 4]
    build_sft_trainer(config).train()  # starts afresh: the dead run's records are not kept twice
    assert [r["step"] for r in read_metrics(tmp_path / "restart")] == [0, 2, 4, 6, 8, 8]


def test_non_finite_loss_stops_with_step_and_stage(tmp_path, tokenizer_dir, demo_files):
    trainer = build_sft_trainer(sft_config(tmp_path, tokenizer_dir, demo_files, "nan", save_every=2))
    real_loss, calls = trainer.loss_fn, {"n": 0}

    def nan_at_step_three(model, batch):
        calls["n"] += model.training  # evaluation batches do not count
        loss, n = real_loss(model, batch)
        return (loss * float("nan") if calls["n"] == 3 else loss), n

    trainer.loss_fn = nan_at_step_three
    with pytest.raises(TrainingError, match=r"\[sft\] non-finite loss \(nan\) at step 3; the last good checkpoint "
                                            r"is .*checkpoint-2; the step's examples are listed in .*nonfinite_batch"):
        trainer.train()
    assert [p.name for p in checkpoints(tmp_path / "nan")] == ["checkpoint-2"]
    record = json.loads((tmp_path / "nan" / NONFINITE_FILE).read_text())
    order = epoch_order(64, 8, trainer.cfg.seed * 100_003, trainer.lengths)
    assert record == {"stage": "sft", "step": 3, "what": "loss (nan)",
                      "example_positions": sorted(order[16:24])}  # the third batch of epoch 0


def test_non_finite_gradient_stops_before_the_update(tmp_path, tokenizer_dir, demo_files):
    trainer = build_sft_trainer(sft_config(tmp_path, tokenizer_dir, demo_files, "inf", save_every=2,
                                           max_grad_norm=None))
    real_loss, calls = trainer.loss_fn, {"n": 0}
    first = next(trainer.model.parameters())

    def infinite_gradient_at_step_three(model, batch):
        calls["n"] += model.training
        loss, n = real_loss(model, batch)
        if calls["n"] == 3:  # a finite loss whose gradient is not
            first.register_hook(lambda grad: grad * float("inf"))
        return loss, n

    trainer.loss_fn = infinite_gradient_at_step_three
    with pytest.raises(TrainingError, match=r"non-finite gradient norm \((inf|nan)\) at step 3"):
        trainer.train()
    assert torch.isfinite(first).all()  # the update never ran
    saved = load_file(tmp_path / "inf" / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in saved.values())
    assert json.loads((tmp_path / "inf" / NONFINITE_FILE).read_text())["step"] == 3


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, tokenizer_dir, demo_files):
    """A real ``rlhfkit sft`` process killed with SIGKILL mid-run, then run again: same final weights."""
    straight = sft_config(tmp_path, tokenizer_dir, demo_files, "straight", max_steps=60, save_every=3, log_every=3)
    build_sft_trainer(straight).train()
    killed = straight.model_dump(mode="json")
    killed["train"]["output_dir"] = str(tmp_path / "k")
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(killed), encoding="utf-8")
    command = [sys.executable, "-m", "rlhfkit", "sft", "--config", str(config)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while len(checkpoints(tmp_path / "k")) < 2 and time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (tmp_path / "k" / "final").exists()
    last = checkpoints(tmp_path / "k")[-1]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {last}" in " ".join((result.stdout + result.stderr).split())
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "k")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    steps = [r["step"] for r in read_metrics(tmp_path / "k") if "loss" in r]
    assert steps == list(range(3, 61, 3))  # no step logged twice, none missing


def test_a_metric_is_averaged_over_the_micro_batches_that_report_it(tmp_path, tokenizer_dir, demo_files):
    """KTO's rewards of desirable completions are absent from a batch without any: no zero may dilute them."""
    trainer = build_sft_trainer(sft_config(tmp_path, tokenizer_dir, demo_files, "stats", grad_accum=2, max_steps=2,
                                           log_every=2))
    real_loss, calls = trainer.loss_fn, {"n": 0}

    def loss_with_sparse_metric(model, batch):
        loss, n = real_loss(model, batch)
        if not model.training:  # evaluation batches
            return loss, n
        calls["n"] += 1
        # micro-batches 1..4 report 1, -, 5, 6: the window's mean is 4, not 12 / 4 = 3
        reported = {1: 1.0, 3: 5.0, 4: 6.0}.get(calls["n"])
        return loss, n, {"always": float(calls["n"]), **({"sometimes": reported} if reported is not None else {})}

    trainer.loss_fn = loss_with_sparse_metric
    trainer.train()
    last = [row for row in read_metrics(tmp_path / "stats") if "loss" in row][-1]
    assert last["sometimes"] == pytest.approx(4.0)
    assert last["always"] == pytest.approx(2.5)


def _padding(order, lengths, batch_size):
    """Padded positions when the batches of ``order`` are each padded to their longest example."""
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_epoch_order_without_lengths_is_the_seeded_permutation():
    assert epoch_order(10, 4, seed=7) == torch.randperm(10, generator=torch.Generator().manual_seed(7)).tolist()


def test_epoch_order_grouped_by_length_cuts_padding_and_keeps_the_last_partial_batch():
    rng = random.Random(0)
    lengths = [rng.randint(10, 100) for _ in range(1003)]
    grouped = epoch_order(1003, 8, seed=3, lengths=lengths)
    plain = epoch_order(1003, 8, seed=3)
    assert sorted(grouped) == list(range(1003))  # every example once
    assert grouped[-3:] == plain[-3:]  # the partial batch is the permutation's tail, as without grouping
    assert grouped == epoch_order(1003, 8, seed=3, lengths=lengths)  # a function of the seed alone
    assert grouped != epoch_order(1003, 8, seed=4, lengths=lengths)
    assert _padding(grouped, lengths, 8) < 0.1 * _padding(plain, lengths, 8)
    batches = [grouped[i:i + 8] for i in range(0, 1000, 8)]
    for batch in batches:  # each batch sorted longest first, and all its members from one group of 50 batches
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
        assert len({plain.index(i) // (8 * 50) for i in batch}) == 1
    first_lengths = [lengths[b[0]] for b in batches]
    assert first_lengths != sorted(first_lengths, reverse=True)  # the batches themselves are shuffled


def test_group_by_length_changes_only_the_order(tmp_path, tokenizer_dir, demo_files):
    grouped = build_sft_trainer(sft_config(tmp_path, tokenizer_dir, demo_files, "grouped"))
    plain = build_sft_trainer(sft_config(tmp_path, tokenizer_dir, demo_files, "plain", group_by_length=False))
    assert grouped.lengths == [len(e.input_ids) for e in grouped.train_examples] and plain.lengths is None
    first_grouped, _ = grouped._micro_batch(0)
    first_plain, _ = plain._micro_batch(0)
    assert first_plain == epoch_order(64, 8, seed=0)[:8]
    widths = [len(grouped.train_examples[i].input_ids) for i in first_grouped]
    assert widths == sorted(widths, reverse=True)


def test_torch_compile_compiles_each_layer_and_trains_like_eager(tmp_path, tokenizer_dir, demo_files):
    eager = build_sft_trainer(sft_config(tmp_path, tokenizer_dir, demo_files, "eager", max_steps=3))
    compiled = build_sft_trainer(sft_config(tmp_path, tokenizer_dir, demo_files, "compiled", max_steps=3,
                                            torch_compile=True))
    layers = compiled.accelerator.unwrap_model(compiled.model).model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert eager.accelerator.unwrap_model(eager.model).model.layers[0]._compiled_call_impl is None
    eager.train()
    compiled.train()
    losses = [[r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r] for name in ("eager", "compiled")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    a, b = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert a.keys() == b.keys()  # the saved model has the plain layout
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_compile_repeated_blocks_falls_back_to_the_whole_model():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert compile_repeated_blocks(model) == 1 and model._compiled_call_impl is not None
