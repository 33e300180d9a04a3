"""Batch scoring of a pairs table: r_chosen, r_rejected, margin and p = σ(margin), per pair and RM version.

Inference mode; chosen and rejected are encoded as a pair (one context), then every sequence is sorted by its own
length and batched (least padding: no gradient ties the two sides of a pair to one forward here). This is what
Stage 2 runs over the whole in-the-wild pool.
"""

from __future__ import annotations

import math

import polars as pl
import torch
from tqdm.auto import tqdm

from pipelines.rm.data import Encoded, LengthPolicy, Renderer, encode_pairs
from pipelines.rm.model import RewardModel
from pipelines.rm.collate import pad_sequences
from pipelines.rm.train import uses_segment_ids

SCORE_SCHEMA = {"pair_id": pl.String, "rm_version": pl.String, "r_chosen": pl.Float64, "r_rejected": pl.Float64,
                "margin": pl.Float64, "p": pl.Float64}


@torch.inference_mode()
def score_rows(rm: RewardModel, rows: list[dict], rm_version: str, *, max_len: int = 256, batch_size: int = 64,
               progress: bool = False) -> tuple[pl.DataFrame, dict]:
    """rows: pair_id, history, chosen, rejected. Over-length pairs are truncated on the history side; pairs whose
    response alone is too long are reported in the returned length dict, not scored."""
    rm.model.eval()
    renderer = Renderer(rm, max_len, LengthPolicy.TRUNCATE)
    enc, length = encode_pairs(renderer, rows)
    seqs = [p.chosen for p in enc] + [p.rejected for p in enc]
    rewards = _score_encoded(rm, seqs, batch_size, progress)
    n = len(enc)
    out = {"pair_id": [p.pair_id for p in enc], "r_chosen": rewards[:n], "r_rejected": rewards[n:]}
    df = pl.DataFrame(out, schema={"pair_id": pl.String, "r_chosen": pl.Float64, "r_rejected": pl.Float64})
    df = df.with_columns(rm_version=pl.lit(rm_version), margin=pl.col("r_chosen") - pl.col("r_rejected"))
    df = df.with_columns(p=1.0 / (1.0 + (-pl.col("margin")).exp())).select(list(SCORE_SCHEMA))
    return df, {**length.as_dict(), "unscored_ids": length.dropped_ids}


@torch.inference_mode()
def score_texts(rm: RewardModel, conversations: list[tuple[list[dict], str]], max_len: int = 256,
                batch_size: int = 64) -> list[float]:
    """One reward per (history, response): for best-of-N benchmarks where one chosen meets several rejected.
    Over-length texts are cut as `Renderer.encode_for_eval` says (special tokens kept); `score_texts_detailed`
    also says how each was cut."""
    return [r for r, _, _ in score_texts_detailed(rm, conversations, max_len, batch_size)]


@torch.inference_mode()
def score_texts_detailed(rm: RewardModel, conversations: list[tuple[list[dict], str]], max_len: int = 256,
                         batch_size: int = 64) -> list[tuple[float, int, str]]:
    """(reward, tokens scored, truncation: none | history | response) per (history, response)."""
    rm.model.eval()
    renderer = Renderer(rm, max_len, LengthPolicy.TRUNCATE)
    fitted = [renderer.encode_for_eval(h, r) for h, r in conversations]
    rewards = _score_encoded(rm, [e for e, _ in fitted], batch_size)
    return [(rw, len(e.ids), how) for rw, (e, how) in zip(rewards, fitted)]


def model_context(rm: RewardModel, cap: int) -> int:
    """The model's own context length (its position embeddings), capped at `cap`."""
    n = getattr(rm.model.config, "max_position_embeddings", None) or cap
    return int(min(n, cap))


def _score_encoded(rm: RewardModel, encoded: list[Encoded], batch_size: int, progress: bool = False) -> list[float]:
    """One reward per encoded sequence, in input order; batches of similar length."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    scores = [math.nan] * len(encoded)
    for s in tqdm(range(0, len(order), batch_size), disable=not progress, desc="rm-score"):
        idx = order[s:s + batch_size]
        inputs = pad_sequences([encoded[i] for i in idx], rm.tokenizer.pad_token_id, uses_segment_ids(rm))
        logits = rm.model(**{k: v.to(rm.device) for k, v in inputs.items()}).logits[:, 0].float()
        for j, i in enumerate(idx):
            scores[i] = float(logits[j])
    return scores
