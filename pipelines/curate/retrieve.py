"""Nearest-neighbour search over pair embeddings with faiss.

Exact inner-product search (IndexFlatIP) up to `hnsw_above` vectors, HNSW beyond (approximate, sub-linear), both
from faiss; `brute_force_search` is the tested reference the ANN results are checked against.
"""

from __future__ import annotations

import math

import faiss
import numpy as np


class VectorIndex:
    def __init__(self, ids: list[str], vectors: np.ndarray, hnsw_above: int = 200_000, m: int = 32):
        self.ids = list(ids)
        d = vectors.shape[1] if vectors.size else 1
        if len(self.ids) > hnsw_above:
            self.index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = 128
        else:
            self.index = faiss.IndexFlatIP(d)
        if vectors.size:
            self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        if len(self.ids) == 0 or k <= 0:
            return np.zeros((len(queries), 0)), [[] for _ in range(len(queries))]
        k = min(k, len(self.ids))
        scores, idx = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, [[self.ids[j] for j in row if j >= 0] for row in idx]


def brute_force_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Reference top-k by inner product (argsort): what the faiss results are checked against in the tests."""
    return np.argsort(-(queries @ vectors.T), axis=1)[:, :k]


def adaptive_k(p: float, k_max: int = 8) -> int:
    """Paper §3.2: k = k_max when the RM got the gold pair wrong (p <= 0.5), else ceil(k_max * (1 - p))."""
    return k_max if p <= 0.5 else int(math.ceil(k_max * (1.0 - p)))
