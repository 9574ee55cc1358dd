"""What an RL rollout is rewarded by: ``ppo.reward_model`` and the weighted sources of ``ppo.rewards`` (online
DPO's judge too: ``online.reward_model`` and ``online.rewards``).

Every source is a :class:`~rlhfkit.rewards.functions.RewardSource`: a reward function (built-in or the user's,
:mod:`rlhfkit.rewards`) or a reward model wrapped as one (:func:`model_reward`), so that one weighted sum with
one set of checks (:func:`~rlhfkit.rewards.functions.combined_rewards`) scores a rollout, and each source's
rewards are logged under its own name (``rewards/<name>``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.config import RewardSourceConfig
from rlhfkit.models.reward import load_for_scoring, score_texts
from rlhfkit.rewards.functions import RewardSource, reward_source

#: The metric name of ``ppo.reward_model``'s rewards.
MAIN_REWARD_MODEL = "reward_model"


def model_reward(name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, weight: float = 1.0,
                 max_length: int, max_prompt_length: int) -> RewardSource:
    """A reward model as a reward source: its normalised scores (:func:`~rlhfkit.models.reward.score_texts`)
    of each (prompt, completion) in a window of ``max_length`` tokens, the prompt at most ``max_prompt_length``."""

    def score(prompts: list, completions: list[str], **_fields) -> list[float]:
        return score_texts(model, tokenizer, prompts, completions, max_length=max_length,
                           max_prompt_length=max_prompt_length)

    return RewardSource(name, score, weight)


def reward_sources(rewards: Sequence[RewardSourceConfig], *, max_length: int, max_prompt_length: int,
                   reward_model: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None) -> list[RewardSource]:
    """The sources a rollout is scored by: ``reward_model`` (``ppo.reward_model``, loaded), weight 1, then every
    entry of ``rewards`` (``ppo.rewards``: reward model directories are loaded here, functions found by name)."""
    window = {"max_length": max_length, "max_prompt_length": max_prompt_length}
    sources = [model_reward(MAIN_REWARD_MODEL, *reward_model, **window)] if reward_model is not None else []
    for spec in rewards:
        if spec.model is not None:
            sources.append(model_reward(spec.metric_name, *load_for_scoring(spec.model), weight=spec.weight, **window))
        else:
            sources.append(reward_source(spec.function, weight=spec.weight, name=spec.metric_name,
                                         options=spec.options))
    return sources


def fields_by_name(records_fields: Sequence[Mapping[str, Any] | None]) -> dict[str, list[Any]]:
    """Per-record extra fields as one list per field name, in record order (None where a record lacks one): the
    ``**fields`` a reward function receives."""
    names = sorted({name for fields in records_fields if fields for name in fields})
    return {name: [(fields or {}).get(name) for fields in records_fields] for name in names}
