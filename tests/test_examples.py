"""The examples under examples/: every config validates as its stage's config, every run.sh parses and uses
only configs that exist, and the public data they read is where run.sh looks (skipped when ../shared/data is absent).

The examples themselves train real models for minutes; their measured figures are in their READMEs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from rlhfkit.config import DPOConfig, PPOConfig, PretrainConfig, RewardConfig, SFTConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
STAGES = {"rm": RewardConfig, "dpo": DPOConfig, "sft": SFTConfig, "ppo": PPOConfig, "pretrain": PretrainConfig}
CONFIGS = sorted(EXAMPLES.glob("*/*.yaml"))
SCRIPTS = sorted(EXAMPLES.glob("*/run.sh"))


def stage_of(path: Path) -> str:
    return path.stem.split("-")[0]


def test_the_four_examples_are_there():
    assert {p.parent.name for p in SCRIPTS} == {"hh-reward-model", "qa-feedback-reward-model", "hh-dpo-smollm2",
                                                 "smollm2-sft-ppo"}
    index = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    for script in SCRIPTS:
        assert (script.parent / "README.md").exists(), script.parent
        assert f"]({script.parent.name}/)" in index, f"examples/README.md does not link {script.parent.name}"


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(EXAMPLES)) for p in CONFIGS])
def test_example_config_validates(path):
    assert stage_of(path) in STAGES, f"{path.name}: name it <stage>[-variant].yaml, stage one of {', '.join(STAGES)}"
    config = load_config(STAGES[stage_of(path)], path)
    example = f"runs/examples/{path.parent.name}/"
    assert config.train.output_dir.startswith(example)  # every run lands in the example's own directory
    for data_path in (config.data.train, config.data.eval):
        assert data_path is None or data_path.startswith("runs/examples/")  # written by a run.sh, not shipped


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.parent.name for p in SCRIPTS])
def test_run_script_parses_and_names_existing_configs(script):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text(encoding="utf-8")
    configs = re.findall(r"--config (\S+\.yaml)", text.replace("$EX", f"examples/{script.parent.name}"))
    assert configs, f"{script} runs no rlhfkit config"
    for config in configs:
        assert (ROOT / config).exists(), f"{script}: {config} is missing"
    assert {Path(c).name for c in configs} == {p.name for p in script.parent.glob("*.yaml")}  # none left unused
    readme = (script.parent / "README.md").read_text(encoding="utf-8")
    for config in configs:
        assert Path(config).name in readme, f"{script.parent.name}/README.md does not mention {Path(config).name}"


def test_outputs_an_example_reads_come_from_an_example_that_writes_them():
    written = set()
    for path in CONFIGS:
        written.add(yaml.safe_load(path.read_text(encoding="utf-8"))["train"]["output_dir"])
    for script in SCRIPTS:  # what a run.sh names under its $OUT (runs/examples/<example>)
        out = f"runs/examples/{script.parent.name}/"
        assert f"OUT={out[:-1]}\n" in script.read_text(encoding="utf-8")
        written.update(out + w for w in re.findall(r"\$OUT/([^\s\"']+)", script.read_text(encoding="utf-8")))
    for path in CONFIGS:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        reads = [config["data"]["train"], config["data"].get("eval"), config["model"].get("name_or_path"),
                 config.get("ppo", {}).get("reward_model")]
        for read in filter(None, reads):
            if read.startswith("runs/examples/models/"):
                continue  # examples/models.sh
            assert any(read.startswith(w) for w in written), f"{path.name}: no example writes {read}"


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.parent.name for p in SCRIPTS])
def test_the_public_data_run_sh_reads_is_there(script):
    sources = re.findall(r"\.\./shared/data/\S+?(?=[}\s\"])", script.read_text(encoding="utf-8"))
    assert sources, f"{script} reads no public data"
    for source in sources:
        if not (ROOT.parent / "shared" / "data").is_dir():
            pytest.skip("../shared/data is absent: the examples' public data live beside the project")
        assert (ROOT / source).exists(), f"{script}: {source} is missing"


def test_length_report_by_hand(tmp_path):
    """examples/hh-reward-model/length_report.py on four pairs whose outcomes are counted here by hand."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("length_report", EXAMPLES / "hh-reward-model" / "length_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pairs = [  # chosen words, rejected words, reward chosen, reward rejected
        (10, 5, 1.0, 0.0),   # longer chosen, model right
        (5, 10, 0.0, 1.0),   # shorter chosen, model wrong
        (10, 11, 0.5, 0.5),  # length-matched (within 20 %), model tied: half
        (12, 10, 2.0, 1.0),  # length-matched, longer chosen, model right
    ]
    rows = [{"prompt": "p", "chosen": " ".join(["w"] * c), "rejected": " ".join(["w"] * r), "reward_chosen": rc,
             "reward_rejected": rr} for c, r, rc, rr in pairs]
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = module.report(scored)
    assert (result["pairs"], result["length_matched_pairs"]) == (4, 2)
    assert result["reward model"]["all"]["mean"] == pytest.approx(2.5 / 4)
    assert result["reward model"]["length_matched"]["mean"] == pytest.approx(1.5 / 2)
    assert result["longer wins"]["all"]["mean"] == pytest.approx(2 / 4)
    assert result["shorter wins"]["length_matched"]["mean"] == pytest.approx(1 / 2)  # right on the third pair only
    assert result["spearman_reward_length"] > 0.5  # longer replies got the higher rewards here
