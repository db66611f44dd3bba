"""Collaborative filtering: LightGCN item vectors trained with BPR on user-item interactions.

They are the CF view of an item that retrieval combines with the text view. Train them only on
interactions before the evaluation period, or the vectors carry the targets.
"""
