"""rlhfkit: align language models with human feedback, end to end."""

__version__ = "0.1.0"
