import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhfkit.config import LoraConfig, ModelConfig
from rlhfkit.data.collators import encode_demonstration, render_prompt
from rlhfkit.models.build import build_causal_lm
from rlhfkit.models.load import load_causal_lm, save_model

UNICODE = "Otters 🦦 swim in the río; naïve café — 水獭 «ça va?»\n\ttabs and  double  spaces"


def test_tokenizer_round_trips_unicode(tokenizer):
    ids = tokenizer(UNICODE, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == UNICODE


def test_tokenizer_has_special_tokens_and_chat_template(tokenizer):
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|end|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    text = render_prompt(tokenizer, "Write a story about otters.")
    assert text == "<|user|>\nWrite a story about otters.<|end|>\n<|assistant|>\n"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_prompt(tokenizer, chat).startswith("<|system|>\nBe brief.<|end|>\n<|user|>\nHi")


def test_demonstration_loss_mask_covers_completion_and_eos(tokenizer):
    example = encode_demonstration(tokenizer, "List two fruits.", "Apples and pears.",
                                   max_length=64, max_prompt_length=32)
    prompt_len = example.loss_mask.index(1)
    assert tokenizer.decode(example.input_ids[:prompt_len]) == render_prompt(tokenizer, "List two fruits.")
    assert tokenizer.decode(example.input_ids[prompt_len:]) == "Apples and pears.<|end|>"
    assert not example.truncated


def test_demonstration_truncation_keeps_prompt_end_and_reports(tokenizer):
    long_prompt = "word " * 100 + "List two fruits."
    example = encode_demonstration(tokenizer, long_prompt, "Apples and pears. " * 20,
                                   max_length=40, max_prompt_length=16)
    assert example.truncated and len(example.input_ids) == 40
    assert example.loss_mask.count(0) == 16
    assert tokenizer.decode(example.input_ids[:16]).endswith("<|assistant|>\n")


def test_saved_model_reloads_with_plain_transformers(tmp_path, tokenizer, tiny_model):
    save_model(tiny_model, tokenizer, str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([tok("Write a story about otters.")["input_ids"]])
    torch.testing.assert_close(model(ids).logits, tiny_model(ids).logits)
    assert tok.chat_template == tokenizer.chat_template


def test_preset_architecture_overrides_and_errors(tokenizer):
    model = build_causal_lm(tokenizer, "tiny", hidden_size=32)
    assert model.config.hidden_size == 32 and model.config.intermediate_size == 128
    assert model.config.vocab_size == len(tokenizer)
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        build_causal_lm(tokenizer, "huge")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['hiden_size'\]"):
        build_causal_lm(tokenizer, "tiny", hiden_size=32)


def test_same_seed_builds_same_weights(tokenizer):
    a, b = build_causal_lm(tokenizer, seed=3), build_causal_lm(tokenizer, seed=3)
    torch.testing.assert_close(a.state_dict(), b.state_dict())


def test_lora_trains_adapters_only_and_saves_merged(tmp_path, tokenizer_dir, tokenizer):
    model, _ = load_causal_lm(ModelConfig(preset="tiny", tokenizer=str(tokenizer_dir),
                                          lora=LoraConfig(r=4, alpha=8)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # make the adapters non-zero so merging changes the weights
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = model(ids).logits
    with model.disable_adapter():
        base = model(ids).logits
    assert not torch.allclose(expected, base)
    save_model(model, tokenizer, str(tmp_path))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)
