"""Built-in verifiable rewards: an exact numeric answer, a required format, a length penalty (in words) and
DAPO's overlong penalty (in tokens).

Answers follow GSM8K's convention (Cobbe et al. 2021): the solution ends with ``#### <number>``. A completion's
answer is the number after its last ``####``, else the content of its last ``\\boxed{...}`` (the MATH
convention), else its last number. Numbers compare as exact decimals after removing thousands separators, a
leading currency sign and trailing zeros, so ``1,000``, ``$1000`` and ``1000.00`` are the same answer.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_HASH_ANSWER = re.compile(r"####\s*(" + _NUMBER + ")")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANY_NUMBER = re.compile(_NUMBER)
#: GSM8K's answer line, the default of :func:`format_reward`.
GSM8K_ANSWER_PATTERN = r"####\s*" + _NUMBER + r"\s*$"


def parse_number(text: str) -> Decimal | None:
    """``text`` as an exact decimal (``"1,000"``, ``"$12"``, ``"-3.50"``), or None when it is not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def extract_answer(text: str) -> Decimal | None:
    """The final numeric answer of ``text``: after its last ``####``, else in its last ``\\boxed{}``, else its
    last number; None when there is none."""
    for pattern in (_HASH_ANSWER, _BOXED):
        found = pattern.findall(text)
        if found:
            return parse_number(found[-1])
    numbers = _ANY_NUMBER.findall(text)
    return parse_number(numbers[-1]) if numbers else None


def exact_answer_reward(prompts: list[str], completions: list[str], *, answer: list[str], **_) -> list[float]:
    """1.0 where the completion's final answer equals the reference ``answer`` field's (a GSM8K solution
    ending in ``#### N``, or a bare number), else 0.0 (also when either has no number)."""
    rewards = []
    for completion, reference in zip(completions, answer, strict=True):
        expected = extract_answer(str(reference))
        got = extract_answer(completion)
        rewards.append(float(expected is not None and got is not None and got == expected))
    return rewards


def format_reward(prompts: list[str], completions: list[str], *, pattern: str = GSM8K_ANSWER_PATTERN,
                  **_) -> list[float]:
    """1.0 where the completion contains a match of the regular expression ``pattern`` (by default GSM8K's
    ``#### <number>`` as the last line), else 0.0."""
    compiled = re.compile(pattern, re.MULTILINE)
    return [float(compiled.search(completion) is not None) for completion in completions]


def length_penalty(prompts: list[str], completions: list[str], *, max_words: int = 200, **_) -> list[float]:
    """0 up to ``max_words`` words, then falling linearly to -1 at twice as many (and staying there)."""
    if max_words <= 0:
        raise ValueError(f"length_penalty: max_words must be positive, got {max_words}")
    return [0.0 - min(max(len(c.split()) - max_words, 0) / max_words, 1.0) for c in completions]  # no -0.0


def overlong_penalty(prompts: list[str], completions: list[str], *, completion_ids: list[list[int]],
                     max_tokens: int, cache_tokens: int, **_) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025) on each completion's length in tokens ``L``: 0 up
    to ``max_tokens - cache_tokens``, then falling linearly to -1 at ``max_tokens`` (and -1 beyond). Set
    ``max_tokens`` to the rollout's ``ppo.max_new_tokens``: answers cut off at the limit get the full penalty,
    those that come close a part of it. ``completion_ids`` is passed by the trainer."""
    if not 0 < cache_tokens <= max_tokens:
        raise ValueError(f"overlong_penalty: needs 0 < cache_tokens <= max_tokens, got cache_tokens={cache_tokens}, "
                         f"max_tokens={max_tokens}")
    free = max_tokens - cache_tokens
    return [0.0 - min(max(len(ids) - free, 0) / cache_tokens, 1.0) for ids in completion_ids]  # no -0.0


#: The built-in reward functions by the name a config gives them.
BUILTIN = {"exact_answer": exact_answer_reward, "format": format_reward, "length_penalty": length_penalty,
           "overlong_penalty": overlong_penalty}
