"""Evaluation: gold-judge scores, reward, KL, win rates, reports."""
