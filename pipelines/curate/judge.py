"""Judging with retrieved human exemplars (paper §3.2, D.3): every pair to be judged is shown to the LLM ensemble
with its nearest human-verified pairs and their human labels; the verdicts are aggregated by two-step
self-consistency. Used by the seed judgments, every Stage-1 iteration and Stage 2's unconfident pairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import polars as pl

from pipelines.annotate.backends import Backend
from pipelines.annotate.cache import cache_scan, parts_of
from pipelines.annotate.prompts import Prompt
from pipelines.annotate.judging import aggregate_judgments, judge_pairs
from pipelines.annotate.validate import RunStats
from pipelines.tables import JUDGMENTS
from pipelines.curate.retrieve import VectorIndex, exemplars_for
from pipelines.embed import vectors_of
from pipelines.lake import Lake
from pipelines.pool import truth_of
from pipelines.tables import EMBEDDINGS


@dataclass
class JudgeSetup:
    """The ensemble and how it samples: one object passed to every stage that judges."""

    judges: list[Backend]
    prompt: Prompt
    samples: int = 3
    temperature: float = 0.7
    exemplars: int = 8
    seed: int = 0
    retry_failed: bool = True  # re-ask samples that failed before (False: a recorded failure is final)
    chunk: int = 256  # pairs per Delta commit of verdicts: what a crash can lose, and a commit's fixed cost

    @property
    def sampling(self) -> str:  # as judge_pairs records it
        return f"t={self.temperature},seed={self.seed}"

    @property
    def model_ids(self) -> list[str]:
        return [j.model_id for j in self.judges]


def embedded(lake: Lake, frame: pl.DataFrame, model: str | None = None) -> tuple[pl.DataFrame, np.ndarray]:
    """`frame` restricted to rows with a stored embedding (order kept) and their vectors, row-aligned. Reads the
    embeddings of `frame`'s ids only (a semi-join), never the whole table. Vectors of two models never mix: `model`
    names the one to read; without it the rows found must all be of one model (else a clear error)."""
    if not lake.exists(EMBEDDINGS) or frame.height == 0:
        return frame.head(0), np.zeros((0, 0), dtype=np.float32)
    scan = lake.scan(EMBEDDINGS).join(frame.select("pair_id").lazy(), on="pair_id", how="semi")
    if model is not None:
        scan = scan.filter(pl.col("embed_model") == model)
    emb = scan.select("pair_id", "embed_model", "vector").unique(["pair_id", "embed_model"]).collect()
    models = emb["embed_model"].unique().sort().to_list()
    if len(models) > 1:
        raise ValueError(f"embeddings of {models} are stored for these pairs: name the model to read (vectors of "
                         "two models are not comparable)")
    joined = frame.join(emb.drop("embed_model"), on="pair_id", how="inner", maintain_order="left")
    return joined.drop("vector"), vectors_of(joined)


def embedding_models(lake: Lake, frame: pl.DataFrame) -> list[str]:
    """The embedding models that have vectors for any of `frame`'s pairs."""
    if not lake.exists(EMBEDDINGS) or frame.height == 0:
        return []
    return (lake.scan(EMBEDDINGS).join(frame.select("pair_id").lazy(), on="pair_id", how="semi")
            .select("embed_model").unique().collect()["embed_model"].sort().to_list())


def exemplar_index(lake: Lake, exemplar_pool: pl.DataFrame, model: str | None = None
                   ) -> tuple[pl.DataFrame, VectorIndex]:
    """Human-verified pairs that may be shown as exemplars (never gold_test), with their ANN index, embedded by
    `model` (or the one model that embedded them)."""
    ex, vecs = embedded(lake, exemplar_pool, model)
    return ex, VectorIndex(ex["pair_id"].to_list(), vecs)


def judge_with_exemplars(lake: Lake, pairs: pl.DataFrame, setup: JudgeSetup, exemplars: tuple[pl.DataFrame, VectorIndex],
                         *, run_id: str, context: str, table: str, vectors: np.ndarray | None = None,
                         on_stats: Callable[[RunStats], None] | None = None) -> pl.DataFrame:
    """Judge `pairs` (attributes attached), nearest exemplars in each prompt; returns their aggregate verdicts.
    `vectors` (row-aligned with `pairs`) are used when given, else the stored embeddings are looked up.
    `on_stats` receives the judging RunStats (requests, tokens per model: what the call cost)."""
    if pairs.height == 0:
        return aggregate_judgments(pl.DataFrame())
    if vectors is None:
        pairs_e, vectors = embedded(lake, pairs)
    else:
        pairs_e = pairs
    gold, index = exemplars
    ex = exemplars_for(pairs_e, vectors, gold, index, setup.exemplars) if pairs_e.height else {}
    truth = truth_of(lake, pairs)
    stats = judge_pairs(lake, pairs, setup.judges, setup.prompt, run_id, samples=setup.samples,
                        temperature=setup.temperature, seed=setup.seed, context=context, table=table,
                        retry_failed=setup.retry_failed, exemplars=ex, chunk=setup.chunk,
                        truth_of=lambda r: truth.get(r["pair_id"]))
    if on_stats:
        on_stats(stats)
    return aggregate_judgments(judgments_of(lake, pairs, setup, table))


def judgments_of(lake: Lake, pairs: pl.DataFrame, setup: JudgeSetup, table: str = JUDGMENTS) -> pl.DataFrame:
    """Stored judgments of `pairs` by this ensemble, prompt version and sampling (every sample)."""
    if not lake.exists(table):
        return pl.DataFrame()
    return (cache_scan(lake, table, parts_of(pairs)).filter((pl.col("prompt_version") == setup.prompt.version)
                                        & (pl.col("sampling") == setup.sampling)
                                        & pl.col("model").is_in(setup.model_ids))
            .join(pairs.select("pair_id").lazy(), on="pair_id", how="semi").collect())
