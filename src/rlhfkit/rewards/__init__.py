"""Rewards beyond a learned reward model: built-in verifiable rewards and user reward functions.

A reward function takes a batch and returns one float per completion::

    def my_reward(prompts: list[str], completions: list[str], **fields) -> list[float]: ...

``fields`` holds each extra field of the prompt records, one value per completion (for example ``answer``,
a reference answer), as TRL passes dataset columns to its reward functions, so a TRL reward function runs
unchanged. :mod:`~rlhfkit.rewards.builtin` has the built-in ones (exact numeric answer, format, length);
:mod:`~rlhfkit.rewards.functions` finds a function by name (``package.module:function`` or
``path/to/file.py:function``) and calls it with the checks that turn a wrong return into a clear error.
"""
