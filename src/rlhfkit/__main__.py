"""``python -m rlhfkit``: the command line."""

from rlhfkit.cli import app

app(prog_name="rlhfkit")
