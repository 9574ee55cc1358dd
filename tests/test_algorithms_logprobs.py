import math

import pytest
import torch

from rlhfkit.algorithms.logprobs import masked_lm_loss, sequence_logprobs, token_logprobs
from rlhfkit.data.collators import Example, PadCollator
from rlhfkit.trainers.sft import lm_loss


def _logits():
    # position 0 -> p = [1/4, 3/4]; position 1 -> p = [1/2, 1/2]; position 2 is never a predictor
    return torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, -5.0]]])


def test_token_logprobs_hand_computed():
    out = token_logprobs(_logits(), torch.tensor([[0, 1, 0]]))
    assert out.shape == (1, 2)
    assert out[0, 0].item() == pytest.approx(math.log(3 / 4), abs=1e-6)
    assert out[0, 1].item() == pytest.approx(math.log(1 / 2), abs=1e-6)


def test_token_logprobs_temperature_divides_logits():
    out = token_logprobs(_logits(), torch.tensor([[0, 1, 0]]), temperature=2.0)
    # logits [0, ln3]/2 -> p(1) = sqrt3 / (1 + sqrt3)
    assert out[0, 0].item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))), abs=1e-6)


def test_masked_lm_loss_hand_computed():
    ids = torch.tensor([[0, 1, 0]])
    both = masked_lm_loss(_logits(), ids, torch.tensor([[0, 1, 1]]))
    assert both.item() == pytest.approx(-(math.log(3 / 4) + math.log(1 / 2)) / 2, abs=1e-6)  # 0.490415
    response_only = masked_lm_loss(_logits(), ids, torch.tensor([[0, 0, 1]]))
    assert response_only.item() == pytest.approx(math.log(2), abs=1e-6)


def test_masked_lm_loss_weighs_tokens_not_sequences():
    logits = torch.zeros(2, 4, 2)
    logits[0, :, 1] = math.log(3.0)  # row 0 predicts token 1 with p = 3/4
    ids = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]])  # 3 targets in row 0, 1 in row 1 (p = 1/2)
    expected = -(3 * math.log(3 / 4) + math.log(1 / 2)) / 4
    assert masked_lm_loss(logits, ids, mask).item() == pytest.approx(expected, abs=1e-6)


def test_masked_lm_loss_rejects_batch_without_targets():
    with pytest.raises(ValueError, match="no target tokens"):
        masked_lm_loss(torch.zeros(1, 3, 2), torch.zeros(1, 3, dtype=torch.long), torch.tensor([[1, 0, 0]]))


def test_sequence_logprobs_sum_and_mean():
    ids = torch.tensor([[0, 1, 0]])
    mask = torch.tensor([[0, 1, 1]])
    total = math.log(3 / 4) + math.log(1 / 2)
    assert sequence_logprobs(_logits(), ids, mask).item() == pytest.approx(total, abs=1e-6)
    assert sequence_logprobs(_logits(), ids, mask, average=True).item() == pytest.approx(total / 2, abs=1e-6)


def test_loss_is_the_same_with_left_and_right_padding(tiny_model):
    examples = [Example([5, 6, 7, 8, 9, 10], [0, 0, 1, 1, 1, 1]), Example([11, 12, 13], [0, 1, 1])]
    right, _ = lm_loss(tiny_model, PadCollator(0, "right")(examples))
    left, _ = lm_loss(tiny_model, PadCollator(0, "left")(examples))
    alone = [lm_loss(tiny_model, PadCollator(0)([e]))[0].item() for e in examples]
    assert right.item() == pytest.approx(left.item(), abs=1e-5)
    # token-weighted over the batch: 4 targets in the first sequence, 2 in the second
    assert right.item() == pytest.approx((alone[0] * 4 + alone[1] * 2) / 6, abs=1e-5)
