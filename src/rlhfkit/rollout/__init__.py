"""Rollouts: sampling completions from a policy."""
