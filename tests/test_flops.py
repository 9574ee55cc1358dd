"""Model FLOPs (rlhfkit.models.flops): hand-computed values, and torch's own FLOP counter on a real model."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

from rlhfkit.models.build import build_causal_lm
from rlhfkit.models.flops import FlopModel, attention_shape, forward_flops, lengths_of, matmul_parameters


def test_forward_flops_by_hand():
    # 2 * N * T + 4 * L * d * T^2 per sequence: N=10, L=2, d=4; T=3 -> 60 + 288, T=1 -> 20 + 32
    assert forward_flops(10, 2, 4, [3]) == 348
    assert forward_flops(10, 2, 4, [3, 1]) == 348 + 52
    assert forward_flops(10, 2, 4, []) == 0


def test_lengths_of_a_padded_mask():
    assert lengths_of(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])) == [2, 4, 1]


def test_matmul_parameters_count_linear_layers_and_a_tied_head(tokenizer):
    model = build_causal_lm(tokenizer, "tiny", seed=0)
    config = model.config
    d, inner, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * inner  # q, k, v, o; gate, up, down (no biases)
    assert matmul_parameters(model) == layers * per_layer + vocab * d  # the LM head, tied or not
    assert attention_shape(config) == (layers, d)


def test_attention_shape_reads_gpt2_and_bert_names():
    assert attention_shape(BertConfig(num_hidden_layers=3, hidden_size=48, num_attention_heads=4)) == (3, 48)

    class GPT2Like:
        n_layer, n_head, n_embd = 5, 2, 32

    assert attention_shape(GPT2Like()) == (5, 32)


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_forward_and_training_flops_match_torch_flop_counter(tokenizer):
    """On unpadded sequences the model FLOPs are what torch counts for every matmul and attention call."""
    model = build_causal_lm(tokenizer, "tiny", seed=0)
    model.set_attn_implementation("eager")  # torch counts its matmuls (not the fused CPU SDPA kernel)
    flops = FlopModel(model)
    ids = torch.randint(5, model.config.vocab_size, (3, 24))

    counted_forward = _counted(lambda: model(input_ids=ids))
    assert counted_forward == pytest.approx(flops.forward([24, 24, 24]), rel=1e-6)

    def train_step():
        model(input_ids=ids, labels=ids).loss.backward()

    # torch counts attention's backward as 2.5 forward passes (five matmuls), the model-FLOP rule as 2:
    # the attention term is a few percent of the total at this size
    assert _counted(train_step) == pytest.approx(flops.training([24, 24, 24]), rel=0.05)


def test_encoder_reward_model_flops(tmp_path):
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=1)
    BertModel(config).save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1).eval()
    model.set_attn_implementation("eager")  # torch counts its matmuls (not the fused CPU SDPA kernel)
    ids = torch.randint(0, 100, (2, 10))
    counted = _counted(lambda: model(input_ids=ids))
    # the rule counts every matmul once per token; BERT's pooler (32 x 32) and score head (32 x 1) run on the
    # [CLS] token only: 18 of the 20 tokens over-counted, 2 * (32 * 32 + 32) FLOPs each (about 5% at this size)
    over_count = 18 * 2 * (32 * 32 + 32)
    assert counted == FlopModel(model).forward([10, 10]) - over_count
