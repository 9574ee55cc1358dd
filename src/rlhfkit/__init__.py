"""rlhfkit: align language models with human feedback, end to end."""

from rlhfkit.data.sources import register_source
from rlhfkit.feedback.source import FEEDBACK_STORE

__version__ = "0.1.0"

# training data can be the feedback app's database URL; data/ reads it through this registration only
register_source(FEEDBACK_STORE)
