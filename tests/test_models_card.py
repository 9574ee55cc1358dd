"""Model cards of final/ models: Hugging Face front matter, the body, and the evaluation's section."""

import pytest
import yaml
from huggingface_hub import ModelCard

from rlhfkit.config import DPOConfig, PPOConfig, SFTConfig, load_config
from rlhfkit.data.readers import write_jsonl
from rlhfkit.models.card import add_evaluation, card_metadata, write_model_card
from rlhfkit.trainers.sft import build_sft_trainer


def front_matter(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tokenizer_dir, task):
    directory = tmp_path_factory.mktemp("card")
    write_jsonl(directory / "train.jsonl", task.demonstrations(task.prompts(16, seed=1), seed=1))
    config = load_config(SFTConfig, base={
        "model": {"preset": "tiny", "tokenizer": str(tokenizer_dir)},
        "data": {"train": str(directory / "train.jsonl"), "eval": str(directory / "train.jsonl"), "max_length": 64},
        "train": {"output_dir": str(directory / "sft"), "batch_size": 8, "max_steps": 2, "progress": False}})
    metrics = build_sft_trainer(config).train()
    return directory / "sft" / "final", metrics


def test_a_tiny_sft_run_writes_a_model_card_the_hub_reads(sft_run):
    final, metrics = sft_run
    metadata, text = front_matter(final / "README.md")
    assert metadata["library_name"] == "rlhfkit" and metadata["tags"] == ["rlhfkit", "sft"]
    assert metadata["pipeline_tag"] == "text-generation"
    assert "base_model" not in metadata and "datasets" not in metadata  # a preset model, local data
    assert f"| eval/loss | {metrics['eval/loss']:.4g} |" in text  # the final metrics
    config = yaml.safe_load(text.split("```yaml\n")[1].split("```")[0])  # the resolved config
    assert config["train"]["max_steps"] == 2 and config["data"]["max_length"] == 64
    card = ModelCard.load(final / "README.md")
    assert card.data.library_name == "rlhfkit" and card.data.tags == ["rlhfkit", "sft"]


def test_base_model_license_and_datasets_come_from_what_the_stage_started_from(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no Hub card to read: no license then
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "README.md").write_text("---\nbase_model: org/base\nlicense: apache-2.0\n---\n# parent\n")
    base = {"data": {"train": "hf:org/prefs:train", "eval": "hf:org/prefs:test"}, "train": {"output_dir": "x"}}
    local = card_metadata("dpo", DPOConfig.model_validate({**base, "model": {"name_or_path": str(parent)},
                                                           "dpo": {"loss": "ipo"}}))
    assert local["base_model"] == "org/base" and local["license"] == "apache-2.0"  # the parent card's
    assert local["datasets"] == ["org/prefs"] and local["tags"] == ["rlhfkit", "dpo", "ipo"]
    hub = card_metadata("ppo", PPOConfig.model_validate({**base, "model": {"name_or_path": "org/not-here"},
                                                         "ppo": {"rewards": [{"function": "length"}],
                                                                 "advantage": "grpo", "samples_per_prompt": 2}}))
    assert hub["base_model"] == "org/not-here" and "license" not in hub and hub["tags"] == ["rlhfkit", "grpo"]
    (parent / "README.md").write_text("---\nlicense: [unclosed\n---\n")  # a card that cannot be read names nothing
    unreadable = DPOConfig.model_validate({**base, "model": {"name_or_path": str(parent)}})
    assert "license" not in card_metadata("dpo", unreadable)


def test_an_evaluation_is_added_to_the_card_once(tmp_path, sft_run):
    config = yaml.safe_load((sft_run[0].parent / "config.yaml").read_text())
    final = tmp_path / "final"
    final.mkdir()
    write_model_card(final, stage="sft", config=SFTConfig.model_validate(config), metrics={"loss": 1.5})
    summary = {"task": "tinyworld", "eval_prompts": 8, "baseline": "base",
               "models": {"base": {"gold/score": 0.25}, "sft": {"gold/score": 0.5, "gold/criteria": {"topic": 1.0}}},
               "win_rates": {"sft": {"gold": {"win_rate": 0.625, "low": 0.5, "high": 0.75}}}}
    assert add_evaluation(final, "sft", summary)
    summary["win_rates"]["sft"]["gold"]["win_rate"] = 0.75  # evaluated again: the section is replaced
    assert add_evaluation(final, "sft", summary)
    metadata, text = front_matter(final / "README.md")
    assert text.count("## Evaluation") == 1 and "| 75.0% | gold | [50.0%, 75.0%] |" in text
    assert "| gold/score | 0.5 |" in text and "62.5%" not in text and "| loss | 1.5 |" in text
    assert metadata["library_name"] == "rlhfkit"
    other = tmp_path / "other"  # a model without an rlhfkit card is left as it is
    other.mkdir()
    assert not add_evaluation(other, "sft", summary) and not (other / "README.md").exists()
