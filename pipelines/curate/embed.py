"""Embeddings of (conversation, attributes) for retrieval (paper: jina-embeddings-v3; CPU default: MiniLM).

Mean-pooled, L2-normalized sentence embeddings, so inner product = cosine. Stored once per (pair_id, model) in
`pair_embeddings`; the ANN index is rebuilt from that table whenever it is needed.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from transformers import AutoModel, AutoTokenizer

EMBEDDINGS = "pair_embeddings"


def pair_text(history: list[dict], task_category: str | None, guideline: str | None, limit: int = 1200) -> str:
    conv = " ".join(f"{m['role']}: {m['content']}" for m in history)[-limit:]
    return f"{conv} | category: {task_category or 'other'} | guideline: {(guideline or '')[:300]}"


class Embedder:
    def __init__(self, path: str, max_len: int = 96, device: str = "cpu"):
        self.name = path.rstrip("/").split("/")[-2] if path.rstrip("/").endswith("/model") else path.rstrip("/").split("/")[-1]
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
    if df.height == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return np.asarray(df["vector"].to_list(), dtype=np.float32)
