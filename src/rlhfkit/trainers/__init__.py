"""Trainers: thin loops that compose the algorithms with models and data."""
