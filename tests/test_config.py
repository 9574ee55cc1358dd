import pytest
import yaml

from rlhfkit.config import ConfigError, SFTConfig, load_config, parse_override, save_config

GOOD = """\
model:
  preset: tiny
  tokenizer: tok
data:
  train: train.jsonl
train:
  output_dir: runs/x
  lr: 0.001
"""


def write(tmp_path, text):
    path = tmp_path / "sft.yaml"
    path.write_text(text)
    return path


def test_loads_file_and_applies_overrides(tmp_path):
    config = load_config(SFTConfig, write(tmp_path, GOOD), ["train.lr=5e-4", "train.batch_size=4",
                                                            "model.lora.r=4"])
    assert config.train.lr == 5e-4
    assert config.train.batch_size == 4
    assert config.model.lora.r == 4
    assert config.data.max_length == 256  # default


def test_unknown_key_names_file_line_and_key(tmp_path):
    path = write(tmp_path, GOOD.replace("  lr: 0.001", "  lrr: 0.001"))
    with pytest.raises(ConfigError) as error:
        load_config(SFTConfig, path)
    assert f"{path}, line 8: train.lrr: unknown key" in str(error.value)


def test_mistyped_value_names_file_line_and_key(tmp_path):
    path = write(tmp_path, GOOD.replace("  lr: 0.001", "  lr: fast"))
    with pytest.raises(ConfigError) as error:
        load_config(SFTConfig, path)
    message = str(error.value)
    assert f"{path}, line 8: train.lr:" in message and "'fast'" in message


def test_bad_override_is_named_as_override(tmp_path):
    with pytest.raises(ConfigError, match=r"--set train.batch_size: train.batch_size: .*greater than 0"):
        load_config(SFTConfig, write(tmp_path, GOOD), ["train.batch_size=0"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("train.lr")


def test_missing_section_and_conflicting_model_source(tmp_path):
    with pytest.raises(ConfigError, match="data: missing required key"):
        load_config(SFTConfig, write(tmp_path, "model: {preset: tiny, tokenizer: t}\ntrain: {output_dir: x}\n"))
    text = GOOD.replace("  preset: tiny", "  preset: tiny\n  name_or_path: gpt2")
    with pytest.raises(ConfigError, match="exactly one of model.name_or_path or model.preset"):
        load_config(SFTConfig, write(tmp_path, text))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SFTConfig, write(tmp_path, "model: [unclosed"))


def test_resolved_config_round_trips(tmp_path):
    config = load_config(SFTConfig, write(tmp_path, GOOD), ["train.seed=7"])
    path = save_config(config, tmp_path / "run")
    again = load_config(SFTConfig, path)
    assert again == config
    assert yaml.safe_load(path.read_text())["train"]["seed"] == 7


def test_override_updates_a_nested_default_section():
    from rlhfkit.demo import DemoConfig

    config = load_config(DemoConfig, None, ["sft.max_steps=7"])
    assert config.sft.max_steps == 7
    assert config.sft.lr == DemoConfig().sft.lr


@pytest.mark.parametrize("name", ["pretrain", "sft", "rm", "ppo", "dpo"])
def test_shipped_configs_are_valid(name):
    from pathlib import Path

    from rlhfkit.config import DPOConfig, PPOConfig, PretrainConfig, RewardConfig

    classes = {"pretrain": PretrainConfig, "sft": SFTConfig, "rm": RewardConfig, "ppo": PPOConfig, "dpo": DPOConfig}
    path = Path(__file__).parent.parent / "configs" / f"{name}.yaml"
    config = load_config(classes[name], path)
    assert config.train.output_dir == f"runs/{name}"


def test_an_override_of_a_yaml_alias_changes_only_its_own_section(tmp_path):
    from rlhfkit.pipeline import load_pipeline

    path = tmp_path / "pipeline.yaml"
    path.write_text("stages: [pretrain, sft]\npretrain: {train: &train {max_steps: 4, lr: 0.1}}\n"
                    "sft: {train: *train}\n")
    config, _ = load_pipeline(path, ["sft.train.lr=0.5"])
    assert config.pretrain["train"]["lr"] == 0.1 and config.sft["train"]["lr"] == 0.5


def test_bare_no_for_mixed_precision_means_no(tmp_path):
    """YAML reads ``no`` as false; ``mixed_precision: no`` (file or --set) still means full precision."""
    config = load_config(SFTConfig, write(tmp_path, GOOD + "  mixed_precision: no\n"))
    assert config.train.mixed_precision == "no"
    assert load_config(SFTConfig, write(tmp_path, GOOD), ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError):
        load_config(SFTConfig, write(tmp_path, GOOD), ["train.mixed_precision=yes"])
