"""Evaluation: retrieval metrics (and, as they land, routing analysis and plots)."""

from omnimoe.eval.metrics import recall_at_k

__all__ = ["recall_at_k"]
