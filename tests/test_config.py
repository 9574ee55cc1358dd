import pytest
import yaml
from pydantic import BaseModel

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


def test_a_trl_name_is_answered_with_its_rlhfkit_key(tmp_path):
    path = write(tmp_path, GOOD.replace("  lr: 0.001", "  learning_rate: 0.001"))
    with pytest.raises(ConfigError) as error:
        load_config(SFTConfig, path)
    assert f"{path}, line 8: train.learning_rate: unknown key; did you mean train.lr?" in str(error.value)
    # a TRL name in the wrong section points at the right one; a name TRL uses twice, at the stage's own key
    with pytest.raises(ConfigError, match=r"train.max_length: unknown key; did you mean data.max_length\?"):
        load_config(SFTConfig, write(tmp_path, GOOD), ["train.max_length=64"])
    from rlhfkit.config import DPOConfig, PPOConfig

    with pytest.raises(ConfigError, match=r"train.beta: unknown key; did you mean dpo.beta\?"):
        load_config(DPOConfig, write(tmp_path, GOOD), ["train.beta=0.2"])
    with pytest.raises(ConfigError, match=r"ppo.beta: unknown key; did you mean ppo.kl_coef\?"):
        load_config(PPOConfig, write(tmp_path, GOOD), ["ppo.reward_model=rm", "ppo.beta=0.04"])


def test_a_misspelt_key_is_answered_with_the_closest_key_of_its_section(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(SFTConfig, write(tmp_path, GOOD.replace("  lr: 0.001", "  lrr: 0.001")))
    assert "train.lrr: unknown key; did you mean train.lr?" in str(error.value)
    with pytest.raises(ConfigError, match=r"model.lora.alpah: unknown key; did you mean model.lora.alpha\?"):
        load_config(SFTConfig, write(tmp_path, GOOD), ["model.lora.alpah=8"])
    with pytest.raises(ConfigError) as error:  # nothing close: no suggestion
        load_config(SFTConfig, write(tmp_path, GOOD), ["train.zzz=1"])
    assert str(error.value).endswith("train.zzz: unknown key")


def test_a_pipeline_section_suggests_keys_with_its_stage_prefix(tmp_path):
    from rlhfkit.config import validate_config

    tree = yaml.safe_load(GOOD.replace("  lr: 0.001", "  gradient_accumulation_steps: 4"))
    with pytest.raises(ConfigError, match=r"p.yaml, line 9: sft.train.gradient_accumulation_steps: unknown key; "
                                          r"did you mean sft.train.grad_accum\?"):
        validate_config(SFTConfig, tree, source="p.yaml", lines={("sft", "train", "gradient_accumulation_steps"): 9},
                        prefix=("sft",))


def test_every_trl_name_points_at_a_key_of_a_stage_config():
    from rlhfkit.config import TRL_NAMES, DPOConfig, OnlineDPOConfig, PPOConfig, RewardConfig

    def keys(cls, prefix=()):
        for name, field in cls.model_fields.items():
            yield ".".join((*prefix, name))
            section = next((t for t in (field.annotation, *getattr(field.annotation, "__args__", ()))
                            if isinstance(t, type) and issubclass(t, BaseModel)), None)
            if section is not None:
                yield from keys(section, (*prefix, name))

    known = {key for cls in (SFTConfig, RewardConfig, DPOConfig, PPOConfig, OnlineDPOConfig) for key in keys(cls)}
    assert [entry.key for entry in TRL_NAMES if entry.key not in known] == []
    assert len({(entry.name, entry.key) for entry in TRL_NAMES}) == len(TRL_NAMES)


def trl_names_table():
    """docs/trl-names.md's table, rendered from rlhfkit.config.TRL_NAMES."""
    from rlhfkit.config import TRL_NAMES

    rows = ["| TRL name | in TRL | rlhfkit key | note |", "| --- | --- | --- | --- |"]
    rows += [f"| `{e.name}` | {e.trl} | `{e.key}` | {e.note} |" for e in TRL_NAMES]
    return "\n".join(rows) + "\n"


def test_trl_names_of_online_dpo_point_at_its_online_section(tmp_path):
    from rlhfkit.config import OnlineDPOConfig

    good = write(tmp_path, GOOD)
    for given, meant in (("train.max_new_tokens=32", "online.max_new_tokens"),
                         ("online.reward_model_path=rm", "online.reward_model"),
                         ("train.temperature=0.7", "online.temperature"), ("online.loss_type=ipo", "dpo.loss")):
        with pytest.raises(ConfigError, match=rf"{given.split('=')[0]}: unknown key; did you mean {meant}\?"):
            load_config(OnlineDPOConfig, good, ["online.task=tinyworld", given])


def test_the_docs_page_of_trl_names_is_the_table():
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "trl-names.md").read_text(encoding="utf-8")
    start = page.index("| TRL name |")
    assert page[start:] == trl_names_table(), "docs/trl-names.md differs from rlhfkit.config.TRL_NAMES"
