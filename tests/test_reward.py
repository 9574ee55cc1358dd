"""Reward models: one forward per completion, padding, encoders, LoRA, bad data, normalisation, CLI, end to end."""

from __future__ import annotations

import json
import logging
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForSequenceClassification
from typer.testing import CliRunner

from rlhfkit import cli
from rlhfkit.algorithms.ranking import expand_pairs, pearson, ranking_loss
from rlhfkit.config import RewardConfig, RewardSection, load_config
from rlhfkit.data.readers import read_records, write_jsonl
from rlhfkit.data.records import PreferenceRecord, RankingRecord
from rlhfkit.engine.metrics import read_metrics
from rlhfkit.evaluate.gold import gold_pairwise_accuracy, labeler_gold_accuracy
from rlhfkit.models.load import load_tokenizer
from rlhfkit.models.reward import (
    MEAN_KEY,
    STD_KEY,
    build_reward_model,
    encode_for_reward,
    head_weight,
    is_decoder_only,
    load_for_scoring,
    normalized_rewards,
    pad_rows,
    score_texts,
    sequence_rewards,
)
from rlhfkit.trainers.reward import (
    RankingCollator,
    build_reward_trainer,
    encode_rankings,
    make_loss_fn,
    normalize_reward_model,
    ranking_metrics,
    reference_texts,
)


def invoke(*args):
    """Run the CLI in-process."""
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def task_rankings(task, n, *, split="train", seed=0, k=4, temperature=None):
    """K demonstrations of mixed quality per prompt, ranked by the simulated labeler."""
    rng = random.Random(seed)
    records = []
    for prompt in task.prompts(n, split=split, seed=seed):
        completions = [d["completion"] for d in task.demonstrations([prompt] * k, seed=rng.randrange(2**31))]
        groups = task.rank(prompt, completions, rng=rng, temperature=temperature)
        if len(groups) >= 2:
            records.append(RankingRecord(prompt, tuple(completions), tuple(tuple(sorted(g)) for g in groups)))
    return records


@pytest.fixture(scope="module")
def ranking_files(tmp_path_factory, task):
    directory = tmp_path_factory.mktemp("rm-data")
    train = task_rankings(task, 96, seed=1, temperature=0)
    evaluation = task_rankings(task, 32, split="test", seed=2, temperature=0)
    write_jsonl(directory / "train.jsonl", train)
    write_jsonl(directory / "eval.jsonl", evaluation)
    return directory


def rm_config(output_dir, tokenizer_dir, files, *, reward=None, model=None, **train):
    return load_config(RewardConfig, base={
        "model": model or {"preset": "tiny", "tokenizer": str(tokenizer_dir)},
        "data": {"train": str(files / "train.jsonl"), "eval": str(files / "eval.jsonl"), "max_length": 160},
        "train": {"output_dir": str(output_dir), "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "max_steps": 8,
                  "log_every": 4, "eval_every": 4, "progress": False, **train},
        "reward": reward or {}})


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, tokenizer_dir, ranking_files):
    """A tiny reward model trained for a few steps with eval; returns its run directory and trainer."""
    run = tmp_path_factory.mktemp("rm") / "run"
    trainer = build_reward_trainer(rm_config(run, tokenizer_dir, ranking_files, max_steps=40, eval_every=20,
                                             log_every=10))
    metrics = trainer.train()
    return run, trainer, metrics


# ---- one forward per completion ---------------------------------------------------------------------------
def test_k_completions_go_through_the_model_once(tokenizer, task):
    model = build_reward_model(tokenizer, "tiny", seed=0)
    records = task_rankings(task, 2, seed=3)  # two prompts, K = 4 each, 6 pairs each
    examples = encode_rankings(tokenizer, records, decoder=True, max_length=160, max_prompt_length=80)
    batch = RankingCollator(tokenizer.pad_token_id, "left")(examples)
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    embedded = []
    model.model.embed_tokens.register_forward_hook(lambda module, args, out: embedded.append(out.shape[0]))
    loss, units, stats = make_loss_fn(RewardSection(), decoder=True)(model, batch)
    assert calls == [8] and embedded == [8]  # K forwards in one call, not K(K-1) (= 2 x 12 rows per pair)
    assert int(units) == 2  # per-prompt weighting: the loss averages over the 2 prompts
    _, units, _ = make_loss_fn(RewardSection(pair_weighting="per_pair"), decoder=True)(model, batch)
    assert int(units) == sum(len(r.pairs()) for r in records) == 12  # ... or over the 12 pairs
    assert {"accuracy", "reward_margin"} <= set(stats)

    # the gathered pair rewards are those of each completion scored on its own, unpadded
    alone = torch.stack([sequence_rewards(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                          decoder=True)[0] for e in examples for ids in e.sequences])
    expected = ranking_loss(alone, expand_pairs([r.pairs() for r in records], [4, 4]))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


class FixedRewards(torch.nn.Module):
    """A stand-in reward model whose output for the batch's i-th row is ``rewards[i]``."""

    def __init__(self, rewards: list[float]):
        super().__init__()
        self.rewards = torch.tensor(rewards)

    def forward(self, input_ids, attention_mask, **kwargs):
        assert input_ids.shape[0] == len(self.rewards)
        return SimpleNamespace(logits=self.rewards[:, None])


def test_the_logged_margin_is_trls_mean_chosen_minus_rejected_reward(tokenizer):
    """TRL's RewardTrainer logs ``margin``, the batch mean of r_chosen - r_rejected; rlhfkit logs it under that
    name (and, the same value, as ``reward_margin``), over every non-tied pair of a K-way ranking."""
    records = [RankingRecord("Sort these.", ("best", "middle", "worst"), ((0,), (1,), (2,))),
               PreferenceRecord("Pick one.", "chosen", "rejected").as_ranking()]
    examples = encode_rankings(tokenizer, records, decoder=True, max_length=64, max_prompt_length=32)
    batch = RankingCollator(tokenizer.pad_token_id, "left")(examples)
    # rows: best 2.0, middle 0.5, worst 1.0; chosen -1.0, rejected 3.0
    model = FixedRewards([2.0, 0.5, 1.0, -1.0, 3.0])
    _, _, stats = make_loss_fn(RewardSection(), decoder=True)(model, batch)
    # pairs best>middle 1.5, best>worst 1.0, middle>worst -0.5, chosen>rejected -4.0: mean -0.5
    assert float(stats["margin"]) == pytest.approx(-0.5)
    assert float(stats["reward_margin"]) == pytest.approx(-0.5)
    assert float(stats["accuracy"]) == pytest.approx(0.5)
    metrics = ranking_metrics(torch.tensor([1.5, 1.0, -0.5, -4.0]), torch.tensor([3, 3, 3, 2]))
    assert metrics["margin"] == metrics["reward_margin"] == pytest.approx(-0.5)  # eval/margin and calibration.json


# ---- padding -----------------------------------------------------------------------------------------------
def decoder_model(kind, tokenizer):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    if kind == "llama":
        return build_reward_model(tokenizer, "tiny", seed=0).eval()
    torch.manual_seed(0)  # GPT-2: absolute position embeddings, so left padding needs the right position ids
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256, num_labels=1,
                        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return GPT2ForSequenceClassification(config).eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_decoder_reward_does_not_depend_on_padding(kind, tokenizer, task):
    model = decoder_model(kind, tokenizer)
    assert is_decoder_only(model.config)
    prompts = task.prompts(3, seed=4)
    completions = ["Yes.", "A fox is a small animal that lives in the woods and eats mice.", "No, it does not."]
    rows = [encode_for_reward(tokenizer, p, [c], decoder=True, max_length=160, max_prompt_length=80)[0][0]
            for p, c in zip(prompts, completions, strict=True)]
    assert rows[0][-1] == tokenizer.eos_token_id  # read at the EOS token
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([r])).logits[:, 0] for r in rows])
        for side in ("left", "right"):
            ids, mask = pad_rows(rows, tokenizer.pad_token_id, side)
            torch.testing.assert_close(sequence_rewards(model, ids, mask, decoder=True), alone, atol=1e-5, rtol=1e-5)
        if kind == "gpt2":  # the test can fail: without mask-derived position ids left padding shifts GPT-2
            ids, mask = pad_rows(rows, tokenizer.pad_token_id, "left")
            assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits[:, 0], alone, atol=1e-3)


def test_pad_token_equal_to_eos_reads_the_last_completion_token(tokenizer_dir, task):
    tokenizer = load_tokenizer(str(tokenizer_dir))
    tokenizer.pad_token = tokenizer.eos_token  # a tokenizer without a pad token of its own
    model = build_reward_model(tokenizer, "tiny", seed=0).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    prompt = task.prompts(1, seed=5)[0]
    ids = encode_for_reward(tokenizer, prompt, ["Yes, it does."], decoder=True, max_length=160,
                            max_prompt_length=80)[0][0]
    assert ids[-1] != tokenizer.eos_token_id  # transformers would take an EOS == pad for padding
    raw = score_texts(model, tokenizer, [prompt, prompt], ["Yes, it does.", "No."], normalize=False)
    with torch.no_grad():
        assert raw[0] == pytest.approx(model(input_ids=torch.tensor([ids])).logits.item(), abs=1e-5)


# ---- encoders ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, task):
    """A tiny random BERT classifier with a WordPiece tokenizer trained here ([CLS] / [SEP] / [PAD])."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("bert")
    demos = task.demonstrations(task.prompts(200, seed=0), seed=0)
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece.train_from_iterator([d["prompt"] + " " + d["completion"] for d in demos],
                                  trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                        num_labels=1)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_bert_encoder_reward_model_trains_and_scores(tmp_path, bert_dir, ranking_files):
    config = rm_config(tmp_path / "bert", None, ranking_files, model={"name_or_path": str(bert_dir)}, max_steps=6,
                       eval_every=None)
    trainer = build_reward_trainer(config)
    assert not trainer.decoder and trainer.collator.side == "right"
    tokenizer = trainer.tokenizer
    first = trainer.trainer.train_examples[0].sequences[0]
    assert first[0] == tokenizer.cls_token_id and first[-1] == tokenizer.sep_token_id
    assert first.count(tokenizer.sep_token_id) == 2  # [CLS] prompt [SEP] completion [SEP]
    metrics = trainer.train()
    assert "eval/accuracy" in metrics and metrics["reward_mean"] == metrics["reward_mean"]

    model, tok = load_for_scoring(str(tmp_path / "bert" / "final"))
    assert type(model).__name__ == "BertForSequenceClassification" and not is_decoder_only(model.config)
    records = read_records(ranking_files / "eval.jsonl", "ranking")[:3]
    prompts = [r.prompt for r in records for _ in r.completions]
    texts = [c for r in records for c in r.completions]
    batched = score_texts(model, tok, prompts, texts, batch_size=16, normalize=False)
    alone = [score_texts(model, tok, [p], [t], normalize=False)[0] for p, t in zip(prompts, texts, strict=True)]
    assert batched == pytest.approx(alone, abs=1e-5)  # right padding leaves [CLS] pooling unchanged


# ---- LoRA --------------------------------------------------------------------------------------------------
def test_lora_trains_adapters_and_the_score_head(tmp_path, tokenizer_dir, ranking_files):
    base = tmp_path / "base"
    model = build_reward_model(load_tokenizer(str(tokenizer_dir)), "tiny", seed=0)
    model.save_pretrained(base)
    load_tokenizer(str(tokenizer_dir)).save_pretrained(base)
    config = rm_config(tmp_path / "lora", tokenizer_dir, ranking_files, max_steps=4, eval_every=None,
                       model={"name_or_path": str(base), "lora": {"r": 4}}, lr=1e-2)
    trainer = build_reward_trainer(config)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)
    trainer.train()
    final = tmp_path / "lora" / "final"
    assert not (final / "adapter_config.json").exists()  # merged: plain transformers loads it
    merged = AutoModelForSequenceClassification.from_pretrained(final)
    assert not torch.equal(merged.score.weight, model.score.weight)  # the head was trained
    q_proj = merged.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_proj, model.model.layers[0].self_attn.q_proj.weight)  # LoRA merged into it


# ---- ODIN: a length head beside the reward head -------------------------------------------------------------
def length_confounded_pairs(n, seed, favour=1):
    """Pairs whose labeler prefers a right answer and, as strongly, a longer one (``favour`` 1) or a shorter one
    (-1): utility = right + favour * words / 8."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        texts = []
        for _ in range(2):
            right = rng.random() < 0.5
            words = rng.randint(1, 16)
            texts.append((right, words, ("Yes." if right else "No.") + " The fox ran." * (words // 3)))
        (a_right, a_words, a), (b_right, b_words, b) = texts
        a_utility, b_utility = a_right + favour * a_words / 8, b_right + favour * b_words / 8
        if a != b and a_utility != b_utility:
            chosen, rejected = (a, b) if a_utility > b_utility else (b, a)
            rows.append({"prompt": "Is a fox red?", "chosen": chosen, "rejected": rejected})
    return rows


@pytest.mark.parametrize("favour", [1, -1], ids=["longer-wins", "shorter-wins"])
def test_length_head_leaves_a_reward_uncorrelated_with_length_and_a_plain_final_model(tmp_path, tokenizer_dir,
                                                                                        favour):
    files = tmp_path / "data"
    files.mkdir()
    write_jsonl(files / "train.jsonl", length_confounded_pairs(400, seed=0, favour=favour))
    write_jsonl(files / "eval.jsonl", length_confounded_pairs(60, seed=1, favour=favour))
    rng = random.Random(2)
    probes = [("Yes." if rng.random() < 0.5 else "No.") + " The fox ran." * rng.randint(0, 5) for _ in range(64)]
    lengths = torch.tensor([float(len(t.split())) for t in probes])
    right = torch.tensor([float(t.startswith("Yes")) for t in probes])
    found = {}
    for name, reward in (("plain", {}), ("odin", {"length_head": True})):
        run = tmp_path / name
        trainer = build_reward_trainer(rm_config(run, tokenizer_dir, files, reward=reward, max_steps=60,
                                                 eval_every=None, log_every=20, save_every=30))
        trainer.train()
        model, tok = load_for_scoring(str(run / "final"))
        scores = torch.tensor(score_texts(model, tok, ["Is a fox red?"] * len(probes), probes, normalize=False))
        found[name] = (favour * pearson(scores, lengths).item(), pearson(scores, right).item())
        in_memory = score_texts(trainer.model, trainer.tokenizer, ["Is a fox red?"] * 4, probes[:4], normalize=False)
        assert scores[:4].tolist() == pytest.approx(in_memory, abs=1e-5)  # final/ is the trained quality head
    plain, odin = found["plain"], found["odin"]
    assert plain[0] > 0.5  # the plain reward model learnt the labeler's length bias
    assert abs(odin[0]) < 0.5 * plain[0]  # the quality head much less so
    assert odin[1] > 0.2  # and still prefers the right answer (0.83 / 0.30 in 60 steps, plain 0.39 / 0.54)

    final = AutoModelForSequenceClassification.from_pretrained(tmp_path / "odin" / "final")
    assert final.config.num_labels == 1 and not hasattr(final.config, "rlhfkit_length_head")
    records = read_metrics(tmp_path / "odin")
    logged = [r for r in records if "length_corr/quality" in r]
    assert logged and {"length_corr/length", "orthogonality"} <= set(logged[-1])
    assert favour * logged[-1]["length_corr/length"] > 0.5  # the length head took the length, the labels' way
    checkpoint = tmp_path / "odin" / "checkpoint-30"  # a checkpoint keeps both heads and still scores (quality)
    model, _ = load_for_scoring(str(checkpoint))
    assert model.config.num_labels == 2 and model.config.rlhfkit_length_head


def test_length_head_with_lora_trains_the_two_output_head(tmp_path, tokenizer_dir, ranking_files):
    base = tmp_path / "base"
    build_reward_model(load_tokenizer(str(tokenizer_dir)), "tiny", seed=0).save_pretrained(base)
    load_tokenizer(str(tokenizer_dir)).save_pretrained(base)
    config = rm_config(tmp_path / "lora", tokenizer_dir, ranking_files, max_steps=3, eval_every=None, lr=1e-2,
                       model={"name_or_path": str(base), "lora": {"r": 4}}, reward={"length_head": True})
    trainer = build_reward_trainer(config)
    assert head_weight(trainer.model).shape[0] == 2  # peft's trainable copy of the head
    trainer.train()
    final = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lora" / "final")
    assert final.config.num_labels == 1 and final.score.weight.shape[0] == 1


# ---- bad data reaches the user -----------------------------------------------------------------------------
GOOD = {"prompt": "Is a fox red?", "completions": ["Yes.", "No."], "ranking": [0, 1]}


@pytest.mark.parametrize("bad, field, message", [
    ({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 0, 1]}, "ranking",
     "index 0 appears more than once"),
    ({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 1, 5]}, "ranking", "index 5 is out of range"),
    ({"prompt": "p", "completions": ["a"], "ranking": [0]}, "completions", "needs at least 2 completions"),
    ({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 1]}, "ranking",
     "ranks 2 indices but there are 3 completions"),
    ({"prompt": "p", "completions": ["a", "  "], "ranking": [1, 0]}, "completions[1]", "is empty"),
    ({"prompt": "p", "chosen": "a", "rejected": ""}, "rejected", "is empty"),
])
def test_bad_records_stop_rm_with_file_line_and_field(tmp_path, tokenizer_dir, monkeypatch, bad, field, message):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    monkeypatch.setattr(cli.console, "width", 1000)  # one line per message
    result = invoke("rm", "--set", "model.preset=tiny", "--set", f"model.tokenizer={tokenizer_dir}",
                    "--set", f"data.train={path}", "--set", f"train.output_dir={tmp_path / 'run'}")
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 2, output
    assert f"{path}, line 2, field '{field}': {message}" in output
    assert not (tmp_path / "run").exists()  # stopped before any training


# ---- a trained model: metrics, calibration, normalisation, reload, score ----------------------------------
def test_metrics_and_calibration_are_written(trained_rm):
    run, trainer, metrics = trained_rm
    records = read_metrics(run)
    train_steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_steps] == [10, 20, 30, 40]
    assert {"loss", "accuracy", "margin", "reward_margin", "lr", "grad_norm"} <= set(train_steps[0])
    assert all(r["margin"] == r["reward_margin"] for r in train_steps)  # TRL's name, and rlhfkit's earlier one
    assert train_steps[-1]["margin"] > 0  # trained: chosen above rejected on average
    assert "ppl" not in train_steps[0]  # not a language-model loss
    evals = [r for r in records if "eval/accuracy" in r]
    assert evals[0]["step"] == 0
    assert {"eval/loss", "eval/margin", "eval/reward_margin", "eval/accuracy/k4"} <= set(evals[0])
    assert evals[-1]["eval/margin"] == evals[-1]["eval/reward_margin"] > 0
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert evals[-1]["eval/accuracy"] > 0.6, evals  # gold-ordered rankings: learnable in 40 steps
    calibration = json.loads((run / "calibration.json").read_text())
    assert calibration["accuracy"] == pytest.approx(metrics["eval/accuracy"])
    assert calibration["pairs"] == evals[-1]["eval/pairs"]
    assert sum(b["count"] for b in calibration["calibration"]["bins"]) == calibration["pairs"]


def test_a_reward_model_scores_with_the_window_it_was_trained_with(trained_rm):
    from transformers import PretrainedConfig

    from rlhfkit.models.reward import WINDOW_KEYS, reading_window

    run, trainer, _ = trained_rm
    saved = json.loads((run / "final" / "config.json").read_text())
    assert [saved[key] for key in WINDOW_KEYS] == [160, 80]  # data.max_length, its default max_prompt_length
    model, tokenizer = load_for_scoring(str(run / "final"))
    assert reading_window(model.config) == (160, 80)
    assert reading_window(model.config, 512, 256) == (160, 80)  # a wider request is cut to the training window
    assert reading_window(model.config, 100, 30) == (100, 30)  # a narrower one is kept
    assert reading_window(PretrainedConfig()) == (512, 256)  # no stored window: the defaults
    record = trainer.train_records[0]
    long_prompt = " ".join([record.prompt if isinstance(record.prompt, str) else record.prompt[-1]["content"]] * 40)
    wide = score_texts(model, tokenizer, [long_prompt], [record.completions[0]], max_length=2048,
                       max_prompt_length=1024, normalize=False)
    assert wide == score_texts(model, tokenizer, [long_prompt], [record.completions[0]], max_length=160,
                               max_prompt_length=80, normalize=False)
    model.config.rlhfkit_max_length, model.config.rlhfkit_max_prompt_length = 2048, 1024
    assert score_texts(model, tokenizer, [long_prompt], [record.completions[0]], normalize=False) != wide


def test_normalised_reference_outputs_score_zero_and_plain_transformers_agrees(trained_rm, ranking_files):
    run, trainer, metrics = trained_rm
    final = run / "final"
    saved = json.loads((final / "config.json").read_text())
    assert saved[MEAN_KEY] == pytest.approx(metrics["reward_mean"]) and STD_KEY not in saved
    model, tokenizer = load_for_scoring(str(final))
    prompts, completions = reference_texts(trainer.config, trainer.train_records)
    assert len(completions) == sum(len(r.completions) for r in trainer.train_records)
    normalized = torch.tensor(score_texts(model, tokenizer, prompts, completions, max_length=160, max_prompt_length=80))
    assert abs(normalized.mean().item()) < 1e-4
    raw = torch.tensor(score_texts(model, tokenizer, prompts, completions, max_length=160, max_prompt_length=80,
                                   normalize=False))
    assert raw.mean().item() == pytest.approx(saved[MEAN_KEY], abs=1e-4)
    torch.testing.assert_close(normalized_rewards(raw, model.config), normalized, atol=1e-5, rtol=1e-5)

    # plain transformers, one sequence, no rlhfkit helper: the raw reward
    plain = AutoModelForSequenceClassification.from_pretrained(final).eval()
    ids = encode_for_reward(tokenizer, prompts[0], [completions[0]], decoder=True, max_length=160,
                            max_prompt_length=80)[0][0]
    with torch.no_grad():
        assert plain(input_ids=torch.tensor([ids])).logits.item() == pytest.approx(raw[0].item(), abs=1e-5)

    # normalize_std: the reference outputs get mean 0 and std 1
    mean, std = normalize_reward_model(model, tokenizer, prompts, completions, with_std=True, batch_size=32,
                                       max_length=160, max_prompt_length=80)
    rescaled = torch.tensor(score_texts(model, tokenizer, prompts, completions, max_length=160, max_prompt_length=80))
    assert std is not None and abs(rescaled.mean().item()) < 1e-4
    assert rescaled.std().item() == pytest.approx(1, abs=1e-4)


def test_reference_file_for_normalisation(tmp_path, trained_rm):
    _, trainer, _ = trained_rm
    path = tmp_path / "reference.jsonl"
    write_jsonl(path, [{"prompt": "Is a fox red?", "completion": "Yes."},
                       {"prompt": "Is a cat big?", "completions": ["No.", "Yes, very."]}])
    config = trainer.config.model_copy(update={"reward": RewardSection(reference=str(path))})
    prompts, completions = reference_texts(config, trainer.train_records)
    assert completions == ["Yes.", "No.", "Yes, very."] and prompts[1] == "Is a cat big?"


def test_reward_model_trains_on_trl_preference_files_as_they_are(tmp_path, tokenizer_dir, task):
    """TRL's standard implicit-prompt preference (train) and conversational preference (eval), without convert-data."""
    records = [pair for ranking in task_rankings(task, 12, seed=5, k=2, temperature=0)
               for pair in ranking.to_preferences()]
    write_jsonl(tmp_path / "train.jsonl", [{"chosen": f"{r.prompt} {r.chosen}", "rejected": f"{r.prompt} {r.rejected}"}
                                           for r in records])
    write_jsonl(tmp_path / "eval.jsonl", [
        {"prompt": [{"role": "user", "content": r.prompt}], "chosen": [{"role": "assistant", "content": r.chosen}],
         "rejected": [{"role": "assistant", "content": r.rejected}]} for r in records])
    trainer = build_reward_trainer(rm_config(tmp_path / "run", tokenizer_dir, tmp_path, max_steps=2, eval_every=2))
    assert len(trainer.train_records) == len(records) and all(r.prompt.strip() for r in trainer.train_records)
    assert {"eval/accuracy", "eval/margin"} <= set(trainer.train())


def test_scorable_rows_take_trl_conversational_completions(tmp_path):
    """reward.reference and rlhfkit score read TRL's conversational completions (a list of one assistant message)."""
    from rlhfkit.data.records import DataError
    from rlhfkit.trainers.reward import iter_scorable

    user = [{"role": "user", "content": "Is a fox red?"}]
    path = tmp_path / "reference.jsonl"
    write_jsonl(path, [{"prompt": user, "completion": [{"role": "assistant", "content": "Yes."}]},
                       {"prompt": user, "chosen": [{"role": "assistant", "content": "Yes."}],
                        "rejected": [{"role": "assistant", "content": "No."}]},
                       {"prompt": user, "completion": [{"role": "user", "content": "Yes."}]}])
    rows = iter_scorable(path)
    assert [next(rows)[3], next(rows)[3]] == [["Yes."], ["Yes.", "No."]]
    with pytest.raises(DataError, match=r"line 3, field 'completion': expected a string or a list of one assistant "
                                        r"message, got list"):
        next(rows)


def test_score_cli_adds_normalised_rewards(tmp_path, trained_rm, monkeypatch):
    run, trainer, _ = trained_rm
    monkeypatch.setattr(cli.console, "width", 1000)
    records = trainer.eval_records[:4]
    rows = [{"prompt": records[0].prompt, "completion": records[0].completions[0], "id": 7},
            {"prompt": records[1].prompt, "chosen": records[1].completions[0], "rejected": records[1].completions[1]},
            *[{"prompt": r.prompt, "completions": list(r.completions),
               "ranking": [list(g) for g in r.ranking]} for r in records[2:]],
            # a pair set (qa-feedback's form): one preference and one tie, so one pair is judged
            {"prompt": records[0].prompt, "completions": list(records[0].completions[:3]),
             "pairs": [[0, 1, 1], [1, 2, 0]]}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["score", "--model", str(run / "final"), "--data", str(tmp_path / "in.jsonl"), "--max-length", "160",
            "--max-prompt-length", "80", "--task", "tinyworld"]
    result = CliRunner().invoke(cli.app, [*args, "--out", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 0, result.output
    scored = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert scored[0]["id"] == 7 and isinstance(scored[0]["reward"], float)
    assert {"reward_chosen", "reward_rejected"} <= set(scored[1]) and len(scored[2]["rewards"]) == 4
    model, tokenizer = load_for_scoring(str(run / "final"))
    expected = score_texts(model, tokenizer, [records[2].prompt] * 4, list(records[2].completions), max_length=160,
                           max_prompt_length=80)
    assert scored[2]["rewards"] == pytest.approx(expected, abs=1e-5)
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["pairs"] == 1 + sum(len(r.pairs()) for r in records[2:]) + 1 and 0 <= summary["accuracy"] <= 1
    assert summary["gold/pairs"] > 0

    result = CliRunner().invoke(cli.app, [*args, "--out", str(tmp_path / "raw.jsonl"), "--raw"])
    raw = [json.loads(line) for line in (tmp_path / "raw.jsonl").read_text().splitlines()]
    mean = model.config.rlhfkit_reward_mean
    assert raw[2]["rewards"] == pytest.approx([r + mean for r in scored[2]["rewards"]], abs=1e-5)


def test_gold_pairwise_accuracy(task):
    prompts = task.prompts(5, seed=6)
    completions = [[d["completion"] for d in task.demonstrations([p] * 4, seed=i)] for i, p in enumerate(prompts)]
    gold = [[task.gold_score(p, c) for c in cs] for p, cs in zip(prompts, completions, strict=True)]
    assert gold_pairwise_accuracy(task, prompts, completions, gold)["gold/accuracy"] == 1.0
    assert gold_pairwise_accuracy(task, prompts, completions, [[-g for g in gs] for gs in gold])["gold/accuracy"] == 0.0


def test_labeler_gold_accuracy_is_the_labelers_agreement_on_the_same_pairs(task):
    from rlhfkit.tasks.tinyworld import TinyWorld

    prompts = task.prompts(200, seed=7)
    completions = [[d["completion"] for d in task.demonstrations([p] * 4, seed=i)] for i, p in enumerate(prompts)]
    # a noiseless labeler without a length bias orders every pair as gold does; with the length bias and no
    # noise it disagrees only where a longer answer is worse by less than the bias
    assert labeler_gold_accuracy(TinyWorld(labeler_bias=0.0, temperature=0.0), prompts, completions) == 1.0
    biased = labeler_gold_accuracy(TinyWorld(temperature=0.0), prompts, completions)
    assert 0.85 < biased < 1.0
    # the default labeler (temperature 0.5) agrees about 73 % of the time on demonstrations (docs/tasks.md)
    noisy = labeler_gold_accuracy(task, prompts, completions, seed=1, repeats=5)
    assert 0.68 < noisy < 0.78
    assert noisy == labeler_gold_accuracy(task, prompts, completions, seed=1, repeats=5)  # seeded
    # pure noise (a huge temperature) is at chance
    assert abs(labeler_gold_accuracy(TinyWorld(temperature=1e6), prompts, completions, repeats=5) - 0.5) < 0.05


# ---- sampling and ranking commands -------------------------------------------------------------------------
def test_sample_writes_k_completions_per_prompt(tmp_path, tokenizer, tiny_model, task, monkeypatch):
    monkeypatch.setattr(cli.console, "width", 1000)
    tiny_model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p, "id": i} for i, p in enumerate(task.prompts(3, seed=7))])
    args = ["sample", "--model", str(tmp_path / "policy"), "--prompts", str(tmp_path / "prompts.jsonl"),
            "--k", "3", "--max-new-tokens", "6", "--seed", "1"]
    result = CliRunner().invoke(cli.app, [*args, "--out", str(tmp_path / "a.jsonl")])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0", "1", "2"] and all(len(r["completions"]) == 3 for r in rows)
    assert len({c for r in rows for c in r["completions"]}) > 3  # sampled, not greedy copies
    CliRunner().invoke(cli.app, [*args, "--out", str(tmp_path / "b.jsonl")])
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()  # seeded


def test_rank_writes_valid_ranking_records(tmp_path, task, monkeypatch):
    monkeypatch.setattr(cli.console, "width", 1000)
    prompts = task.prompts(20, seed=8)
    rows = [{"prompt": p, "completions": [d["completion"] for d in task.demonstrations([p] * 4, seed=i)], "id": i}
            for i, p in enumerate(prompts)]
    rows[0]["completions"][1] = rows[0]["completions"][0]  # identical texts are tied
    rows[1]["completions"][2] = ""  # an empty sample is dropped
    write_jsonl(tmp_path / "samples.jsonl", rows)
    for name in ("a", "b"):
        result = invoke("rank", "--task", "tinyworld", "--samples", tmp_path / "samples.jsonl",
                        "--out", tmp_path / f"{name}.jsonl", "--seed", "3")
        assert result.exit_code == 0, result.output
    assert "1 empty completions dropped" in result.output
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()  # seeded
    records = read_records(tmp_path / "a.jsonl", "ranking")
    assert len(records) == 20 and records[0].id == "0" and records[0].labeler == "tinyworld-simulated"
    assert any(set(group) == {0, 1} for group in records[0].ranking)
    assert len(records[1].completions) == 3
    # noisy but informative: the labeler agrees with the gold order more often than not
    gold = [[task.gold_score(r.prompt, c) for c in r.completions] for r in records]
    agree = [g[w] > g[lo] for r, g in zip(records, gold, strict=True) for w, lo in r.pairs() if g[w] != g[lo]]
    assert sum(agree) / len(agree) > 0.55


# ---- end to end on the built-in task ----------------------------------------------------------------------
@pytest.mark.slow
def test_reward_model_from_sft_samples_agrees_with_the_gold_judge(demo_run, tmp_path, monkeypatch):
    """sample K = 4 from the SFT model -> simulated labeler ranks -> RM from sft/final -> gold accuracy.

    Measured on the demo_run fixture (its SFT model scores ~0.1 by the gold judge, so its samples differ
    little and the default labeler agrees with gold on only ~55% of their pairs): 0.59-0.62 gold accuracy
    over three prompt seeds, against 0.52-0.56 for the same model before training; the bound leaves room.
    """
    from rlhfkit.tasks import get_task

    monkeypatch.setattr(cli.console, "width", 1000)
    task = get_task("tinyworld")
    write_jsonl(tmp_path / "train_prompts.jsonl", [{"prompt": p} for p in task.prompts(600, split="train", seed=11)])
    write_jsonl(tmp_path / "test_prompts.jsonl", [{"prompt": p} for p in task.prompts(100, split="test", seed=12)])
    sft = str(demo_run / "sft" / "final")
    for split in ("train", "test"):
        result = invoke("sample", "--model", sft, "--prompts", tmp_path / f"{split}_prompts.jsonl", "--k", "4",
                        "--max-new-tokens", "48", "--temperature", "0.7", "--batch-size", "64",
                        "--out", tmp_path / f"{split}_samples.jsonl")
        assert result.exit_code == 0, result.output
        result = invoke("rank", "--task", "tinyworld", "--samples", tmp_path / f"{split}_samples.jsonl",
                        "--out", tmp_path / f"{split}_rankings.jsonl", "--seed", "0")
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli.app, [
        "rm", "--set", f"model.name_or_path={sft}", "--set", f"data.train={tmp_path / 'train_rankings.jsonl'}",
        "--set", f"data.eval={tmp_path / 'test_rankings.jsonl'}", "--set", "data.max_length=128",
        "--set", f"train.output_dir={tmp_path / 'rm'}", "--set", "train.batch_size=8", "--set", "train.epochs=2",
        "--set", "train.lr=5e-4", "--set", "train.warmup_steps=5", "--set", "train.progress=false"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rm" / "calibration.json").exists()
    result = CliRunner().invoke(cli.app, ["score", "--model", str(tmp_path / "rm" / "final"), "--data",
                                     str(tmp_path / "test_samples.jsonl"), "--out", str(tmp_path / "scored.jsonl"),
                                     "--task", "tinyworld"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    print(summary)
    assert summary["gold/pairs"] > 400
    assert summary["gold/accuracy"] > 0.56, summary  # chance is 0.5; ~0.02 standard error


def test_long_inputs_are_cut_to_the_window_without_the_tokenizer_warning(tokenizer_dir, task):
    """The prompt and completion are tokenized whole, then cut to the window: transformers' "Token indices sequence
    length is longer than the specified maximum" (printed on every run with long dialogues) does not apply."""
    tokenizer = load_tokenizer(str(tokenizer_dir))
    tokenizer.model_max_length = 16
    logged: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = logged.append
    logging.getLogger("transformers").addHandler(handler)  # transformers' own handler does not propagate
    try:
        [(ids, truncated, _)] = encode_for_reward(tokenizer, " ".join(task.prompts(8, seed=1)),
                                                  ["Yes, it does. " * 20], decoder=True, max_length=24,
                                                  max_prompt_length=12)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert truncated and len(ids) == 24
    assert not [r for r in logged if "longer than the specified maximum" in r.getMessage()]
