"""Trainers read a feedback database's URL directly, as they read ``rlhfkit export``'s files."""

from __future__ import annotations

import json

import pytest

from rlhfkit.config import RewardConfig, SFTConfig, load_config
from rlhfkit.data.readers import DataFileNotFoundError, read_records
from rlhfkit.data.records import DataError
from rlhfkit.feedback.source import is_database_url
from rlhfkit.feedback.store import Store
from rlhfkit.trainers.reward import build_reward_trainer
from rlhfkit.trainers.sft import build_sft_trainer

RANKING = {"ratings": [7, 4, 1], "flags": [[], [], ["made_up_facts"]], "ranking": [[0], [1, 2]]}


@pytest.fixture
def labeled(tmp_path, task):
    """A SQLite feedback database where one labeler ranked 12 samples and wrote 12 demonstrations."""
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = Store(url)
    ann = store.create_user("ann", "hash")
    prompts = task.prompts(12, seed=5)
    demonstrations = task.demonstrations(prompts, seed=5)
    store.import_samples([{"prompt": prompt, "completions": [demonstration["completion"], "I do not know.", "Bananas."]}
                          for prompt, demonstration in zip(prompts, demonstrations, strict=True)])
    store.import_prompts([{"prompt": prompt} for prompt in prompts])
    while (item := store.next_item(ann.id)) is not None:
        if item.kind == "ranking":
            store.submit(ann.id, item.id, RANKING)
        else:
            store.submit(ann.id, item.id, {"completion": f"A demonstration for {item.prompt}"})
    store.close()
    return url


def test_database_urls_are_recognised():
    assert is_database_url("sqlite:///f.db") and is_database_url("postgresql+psycopg://u@h/db")
    assert not is_database_url("data/train.jsonl") and not is_database_url("hf:org/name")
    assert not is_database_url("https://example.org/x.jsonl")


def test_read_records_from_the_database(labeled):
    rankings = read_records(labeled, "ranking")
    assert len(rankings) == 12 and rankings[0].ranking == ((0,), (1, 2))
    assert len(read_records(labeled, "preference")) == 24  # two untied pairs per ranking
    assert len(read_records(labeled, "demonstration", limit=5)) == 5
    with pytest.raises(DataError, match="holds demonstration, ranking, preference records, not prompt records"):
        read_records(labeled, "prompt")
    with pytest.raises(DataError, match="without splits"):
        read_records(labeled, "ranking", split="train")


def test_missing_or_foreign_databases_are_clear_errors(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="no such database file"):
        read_records(f"sqlite:///{tmp_path / 'nope.db'}", "ranking")
    (tmp_path / "other.db").write_bytes(b"")
    with pytest.raises(DataError, match="cannot read the feedback database"):
        read_records(f"sqlite:///{tmp_path / 'other.db'}", "ranking")
    assert not (tmp_path / "nope.db").exists()


def test_reward_model_and_sft_train_from_the_database_url(tmp_path, tokenizer_dir, labeled):
    common = {"output_dir": None, "batch_size": 4, "max_steps": 2, "log_every": 1, "eval_every": None,
              "progress": False}
    rm = load_config(RewardConfig, base={
        "model": {"preset": "tiny", "tokenizer": str(tokenizer_dir)}, "data": {"train": labeled, "max_length": 128},
        "train": {**common, "output_dir": str(tmp_path / "rm")}})
    build_reward_trainer(rm).train()
    assert _last_step(tmp_path / "rm") == 2
    sft = load_config(SFTConfig, base={
        "model": {"preset": "tiny", "tokenizer": str(tokenizer_dir)}, "data": {"train": labeled, "max_length": 128},
        "train": {**common, "output_dir": str(tmp_path / "sft")}})
    build_sft_trainer(sft).train()
    assert _last_step(tmp_path / "sft") == 2


def _last_step(run) -> int:
    assert (run / "final").is_dir()
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return json.loads(lines[-1])["step"]
