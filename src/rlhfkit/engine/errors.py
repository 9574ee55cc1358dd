"""The error that stops a training run with a message for the user."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the last good checkpoint is left intact."""
