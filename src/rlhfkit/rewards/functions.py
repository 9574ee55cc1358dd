"""Reward functions by name, called with checks, and their weighted sum.

A name is a built-in (:data:`rlhfkit.rewards.builtin.BUILTIN`: ``exact_answer``, ``format``,
``length_penalty``), an importable ``package.module:function``, or a file ``path/to/file.py:function``.
Whatever a function does wrong (it raises, returns the wrong number of values, a value that is not a
finite number) stops the run with a :class:`RewardFunctionError` that names it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit.rewards.builtin import BUILTIN

RewardFunction = Callable[..., Sequence[float]]


class RewardFunctionError(ValueError):
    """A reward function cannot be found, or it failed or returned something other than one number per completion."""


def load_reward_function(name: str) -> RewardFunction:
    """The function ``name`` refers to: a built-in, ``package.module:function`` or ``path/to/file.py:function``."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, sep, attribute = name.rpartition(":")
    if not sep or not module_name or not attribute:
        raise RewardFunctionError(f"reward function {name!r}: expected a built-in ({', '.join(BUILTIN)}), "
                                  "'package.module:function' or 'path/to/file.py:function'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise RewardFunctionError(f"reward function {name!r}: no file {path}")
            spec = importlib.util.spec_from_file_location(f"rlhfkit_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except RewardFunctionError:
        raise
    except Exception as error:  # the user's module failed to import: say which and why
        raise RewardFunctionError(f"reward function {name!r}: importing {module_name} failed: "
                                  f"{type(error).__name__}: {error}") from error
    function = getattr(module, attribute, None)
    if not callable(function):
        raise RewardFunctionError(f"reward function {name!r}: {module_name} has no function {attribute!r}")
    return function


@dataclass(frozen=True)
class RewardSource:
    """One reward function with its weight and options (keyword arguments passed on every call)."""

    name: str  # how metrics and errors name it: rewards/<name>
    function: RewardFunction
    weight: float = 1.0
    options: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 fields: Mapping[str, Sequence[Any]]) -> list[float]:
        """The function's rewards for a batch, checked: one finite number per completion."""
        try:
            values = self.function(prompts=list(prompts), completions=list(completions),
                                   **{**fields, **self.options})
        except Exception as error:
            message = f"reward function {self.name!r} raised {type(error).__name__}: {error}"
            raise RewardFunctionError(message) from error
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError) as error:
            raise RewardFunctionError(f"reward function {self.name!r} must return one number per completion, "
                                      f"got {type(values).__name__}: {error}") from error
        if len(values) != len(completions):
            raise RewardFunctionError(f"reward function {self.name!r} returned {len(values)} values for "
                                      f"{len(completions)} completions")
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise RewardFunctionError(f"reward function {self.name!r} returned {value} for completion {i}: "
                                          f"{completions[i][:80]!r}")
        return values


def reward_source(function: str, *, weight: float = 1.0, name: str | None = None,
                  options: Mapping[str, Any] | None = None) -> RewardSource:
    """A :class:`RewardSource` from a function name (see :func:`load_reward_function`); its metric name is
    ``name``, else the function's own name."""
    loaded = load_reward_function(function)
    options = dict(options or {})
    # an option sets a named parameter: a typo must not vanish into the function's **fields
    named = {name for name, p in inspect.signature(loaded).parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"prompts", "completions"}
    unknown = [key for key in options if key not in named]
    if unknown:
        raise RewardFunctionError(f"reward function {function!r} takes no option {', '.join(map(repr, unknown))}")
    return RewardSource(name or function.rpartition(":")[2], loaded, weight, options)


def combined_rewards(sources: Sequence[RewardSource], prompts: Sequence[str], completions: Sequence[str],
                     fields: Mapping[str, Sequence[Any]] | None = None) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted sum of every source's rewards per completion, and each source's own rewards by name."""
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise RewardFunctionError(f"reward functions share a name ({', '.join(names)}): give each its own 'name'")
    per_source = {source.name: source(prompts, completions, fields or {}) for source in sources}
    totals = [sum(source.weight * per_source[source.name][i] for source in sources) for i in range(len(completions))]
    return totals, per_source
