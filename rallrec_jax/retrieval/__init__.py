"""Retrieval over item vectors: prompt histories, nearest-neighbour indexes, user candidates.

`history` chooses the K history items of each sample's prompt; `index` builds, saves and
queries ScaNN and exact indexes (cosine similarity, per-query exclusions) and computes each
item's nearest neighbours; `candidates` turns histories into user vectors, recommends unseen
items and scores them with recall and NDCG.
"""
