"""Evaluation: metrics and checkpoint-based scoring."""
