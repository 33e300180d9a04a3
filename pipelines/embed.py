"""Embeddings of (conversation, attributes) for retrieval (paper: jina-embeddings-v3; CPU default: MiniLM).

Mean-pooled, L2-normalized sentence embeddings, so inner product = cosine. Stage 1's pool is stored once per
(pair_id, model) in `pair_embeddings` (the ANN index is rebuilt from it whenever it is needed; see
`pipelines.curate.prepare.embed_pool`); Stage 2 embeds only its unconfident pairs, in memory, for their exemplar
lookup. Here, below compute, because compute runs the Embedder (in process or as Ray actors) and curate uses it.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from transformers import AutoModel, AutoTokenizer


def model_name(path: str) -> str:
    """A short stable name for an embedding model folder (the package's `.../<name>/model` layout included)."""
    p = path.rstrip("/")
    return p.split("/")[-2] if p.endswith("/model") else p.split("/")[-1]


def pair_text(history: list[dict], task_category: str | None, guideline: str | None, limit: int = 1200) -> str:
    conv = " ".join(f"{m['role']}: {m['content']}" for m in history)[-limit:]
    return f"{conv} | category: {task_category or 'other'} | guideline: {(guideline or '')[:300]}"


class Embedder:
    def __init__(self, path: str, max_len: int = 96, device: str = "cpu"):
        self.name = model_name(path)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.max_len = max_len
        self.device = device

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 128) -> np.ndarray:
        out = []
        order = np.argsort([len(t) for t in texts])
        for i in range(0, len(texts), batch_size):
            idx = order[i:i + batch_size]
            enc = self.tok([texts[j] for j in idx], padding=True, truncation=True, max_length=self.max_len,
                           return_tensors="pt").to(self.device)
            h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            v = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)
            out.append((idx, v.float().cpu().numpy()))
        res = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        for idx, v in out:
            res[idx] = v
        return res


def embedding_frame(pair_ids: list[str], vectors: np.ndarray, model: str) -> pl.DataFrame:
    return pl.DataFrame({"pair_id": pair_ids, "embed_model": [model] * len(pair_ids),
                         "vector": pl.Series(vectors.tolist(), dtype=pl.List(pl.Float32))})


def vectors_of(df: pl.DataFrame) -> np.ndarray:
    """The `vector` column as one float32 matrix, straight from Arrow (no Python float per component)."""
    if df.height == 0:
        return np.zeros((0, 0), dtype=np.float32)
    lens = df["vector"].list.len()
    if lens.null_count() or lens.min() != lens.max():
        raise ValueError("embeddings of different widths (or missing) in one frame: one embedding model at a time")
    return df["vector"].explode().cast(pl.Float32).to_numpy().reshape(df.height, int(lens.max()))


def texts_of(pairs: pl.DataFrame) -> list[str]:
    """pair_text of every row of a frame with history, task_category, guideline."""
    return [pair_text(h, c, g) for h, c, g in pairs.select("history", "task_category", "guideline").iter_rows()]
