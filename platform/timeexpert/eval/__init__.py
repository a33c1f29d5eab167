"""Evaluation: metrics that match the official scorers, answer parsing, evaluation runs."""
