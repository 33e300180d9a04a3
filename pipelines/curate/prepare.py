"""Stage 1's pool D_un made ready for review and retrieval: its attributes (`llm_annotations`) and its embeddings
(`pair_embeddings`), one work unit of the raw table at a time. Curate's business, so that neither annotate nor the
pool helpers depend on the other: annotate labels the pairs it is given, pipelines.pool cuts the units.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import polars as pl

from pipelines.annotate.attributes import with_attributes
from pipelines.annotate.backends import Backend, LLMUnavailable
from pipelines.annotate.prompts import Prompt
from pipelines.annotate.attributes import annotate_attributes, annotation_failures
from pipelines.annotate.validate import RunStats
from pipelines.embed import embedding_frame, texts_of
from pipelines.lake import Lake
from pipelines.pool import read_unit, work_units
from pipelines.tables import EMBEDDINGS


def annotate_pool(lake: Lake, backend: Backend, prompt: Prompt, run_id: str, *, stage1_fraction: float,
                  unit_rows: int = 50_000, chunk: int = 256, max_attempts: int = 3,
                  categories: Callable[[pl.DataFrame], dict[str, str]] | None = None,
                  on_failed: Callable[[pl.DataFrame], None] | None = None) -> RunStats:
    """Attributes for Stage 1's pool (review queue, retrieval), one work unit of the raw table at a time.
    Stage 2 annotates only its own unconfident pairs, inside Stage 2. `categories(unit_pairs)` gives the simulated
    annotator its answers (project-made data). `on_failed` receives each unit's pairs that could not be annotated
    (with provenance) to quarantine them."""
    total = RunStats()
    t0 = time.perf_counter()
    for unit in work_units(lake, unit_rows):
        pairs = read_unit(lake, unit, "stage1", stage1_fraction, exclude_verified=False)
        if pairs.height == 0:
            continue
        cats = categories(pairs) if categories else {}
        missing: LLMUnavailable | None = None
        try:
            st = annotate_attributes(lake, pairs, backend, prompt, run_id, chunk=chunk, max_attempts=max_attempts,
                                     category_of=lambda r: cats.get(r["pair_id"]) or r.get("category_hint"))
        except LLMUnavailable as e:  # what was answered is committed; the bad pairs found still go to quarantine
            st, missing = e.stats, e
        total.merge(st)
        if on_failed and st.failed:
            on_failed(annotation_failures(lake, pairs, backend.model_id, prompt.version))
        if missing is not None:
            raise LLMUnavailable(f"annotation unit {unit.name} unfinished (earlier units done; the next run "
                                 f"continues here): {missing}", total) from missing
    total.seconds = time.perf_counter() - t0
    return total


def embed_pool(lake, encode: Callable[[list[str]], np.ndarray], model_name: str, *, stage1_fraction: float,
               unit_rows: int = 50_000) -> dict[str, int]:
    """Embed every annotated pair of Stage 1's pool that has no embedding under `model_name` yet, one work unit of
    the raw table at a time; one append per unit. Returns {"embedded": n, "cached": m}."""
    counts = {"embedded": 0, "cached": 0}
    for unit in work_units(lake, unit_rows):
        pairs = with_attributes(read_unit(lake, unit, "stage1", stage1_fraction, exclude_verified=False).lazy(),
                                lake).collect()
        if pairs.height == 0:
            continue
        if lake.exists(EMBEDDINGS):
            have = (lake.scan(EMBEDDINGS).filter(pl.col("embed_model") == model_name).select("pair_id")
                    .join(pairs.select("pair_id").lazy(), on="pair_id", how="semi").collect())
            counts["cached"] += have.height
            pairs = pairs.join(have, on="pair_id", how="anti")
        if pairs.height:
            vecs = encode(texts_of(pairs))
            lake.append(EMBEDDINGS, embedding_frame(pairs["pair_id"].to_list(), vecs, model_name).to_arrow())
            counts["embedded"] += pairs.height
    return counts
