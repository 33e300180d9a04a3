"""Nearest-neighbour search over pair embeddings with faiss, and the two lookups curation makes with it.

Exact inner-product search (IndexFlatIP) up to `hnsw_above` vectors, HNSW beyond (approximate, sub-linear), both
from faiss; `brute_force_search` is the tested reference the ANN results are checked against. `retrieve_for_gold`
(Stage 1's error-driven retrieval) and `exemplars_for` (the judges' human exemplars) live here, below both
stage1 and judge, which use them.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import polars as pl


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


def retrieve_for_gold(gold_p: pl.DataFrame, gold_vecs: np.ndarray, pool_index: VectorIndex,
                      k_max: int = 8) -> pl.DataFrame:
    """gold_p: pair_id, p (rows aligned with gold_vecs). Returns query_pair_id, pair_id, rank, similarity, k, p."""
    rows = []
    ks = [adaptive_k(float(p), k_max) for p in gold_p["p"].to_list()]
    if not ks or len(pool_index) == 0:
        return pl.DataFrame(schema={"query_pair_id": pl.String, "pair_id": pl.String, "rank": pl.Int64,
                                    "similarity": pl.Float64, "k": pl.Int64, "p": pl.Float64})
    scores, ids = pool_index.search(gold_vecs, max(ks))
    for q, (qid, p, k) in enumerate(zip(gold_p["pair_id"].to_list(), gold_p["p"].to_list(), ks)):
        for rank, (pid, s) in enumerate(zip(ids[q][:k], scores[q][:k])):
            rows.append({"query_pair_id": qid, "pair_id": pid, "rank": rank, "similarity": float(s), "k": k,
                         "p": float(p)})
    return pl.DataFrame(rows, schema={"query_pair_id": pl.String, "pair_id": pl.String, "rank": pl.Int64,
                                      "similarity": pl.Float64, "k": pl.Int64, "p": pl.Float64})


def exemplars_for(pairs: pl.DataFrame, pair_vecs: np.ndarray, gold: pl.DataFrame, gold_index: VectorIndex,
                  n: int = 8) -> dict[str, list[dict]]:
    """The n nearest human-verified pairs (with attributes and human label) for each pair to be judged."""
    if len(gold_index) == 0 or pairs.height == 0:
        return {}
    by_id = {r["pair_id"]: r for r in gold.iter_rows(named=True)}
    _, ids = gold_index.search(pair_vecs, n)
    return {pid: [by_id[g] for g in ids[i] if g in by_id and g != pid]
            for i, pid in enumerate(pairs["pair_id"].to_list())}
