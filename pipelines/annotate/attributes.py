"""The five preference attributes (paper §3.2) of a pair: asked of an LLM (`annotate_attributes`, cached and
resumable: keyed by (pair_id, model, prompt_version), appended chunk by chunk, a later row superseding an earlier
one) and read back (`attributes`): what curate, review and the CLI join onto pairs. Here in
annotate, next to the cache that holds them, so that pipelines.pool needs no annotate import."""

from __future__ import annotations

import random
import time
from typing import Callable

import polars as pl

from pipelines.annotate.backends import Backend, Request
from pipelines.annotate.cache import cache_append, cache_scan, compact, done_keys, parts_of, with_parts
from pipelines.annotate.prompts import Prompt, conversation_text
from pipelines.annotate.taxonomy import ATTRIBUTES_JSON_SCHEMA, TASK_CATEGORIES, Attributes
from pipelines.annotate.validate import RunStats, chunks, generate_validated, label_origin_of, unavailable
from pipelines.lake import Lake, latest_by_key, now_utc
from pipelines.tables import ANNOTATIONS

ATTRIBUTE_COLUMNS = ["task_category", "objectivity", "controversiality", "desired_attributes", "guideline"]


# a polars frame schema (pair_id + ATTRIBUTE_COLUMNS); taxonomy.ATTRIBUTES_JSON_SCHEMA is the LLM's JSON schema
ATTRIBUTES_SCHEMA = {"pair_id": pl.String, "task_category": pl.String, "objectivity": pl.String,
                     "controversiality": pl.String, "desired_attributes": pl.List(pl.String), "guideline": pl.String}


def attributes(lake: Lake, ids: pl.DataFrame | pl.LazyFrame | None = None, table: str = ANNOTATIONS) -> pl.LazyFrame:
    """pair_id + the latest successful attributes, lazily; of `ids` only when given (the semi-join comes before
    the latest-row sort, so a bounded caller never sorts the whole table)."""
    if not lake.exists(table):
        return pl.LazyFrame(schema=ATTRIBUTES_SCHEMA)
    parts = parts_of(ids) if isinstance(ids, pl.DataFrame) else None  # a unit's frame reads its cache blocks only
    ok = cache_scan(lake, table, parts).filter(pl.col("status") == "ok")
    if ids is not None:
        ok = ok.join(ids.select("pair_id").lazy(), on="pair_id", how="semi")
    return latest_by_key(ok, ["pair_id"]).select("pair_id", *ATTRIBUTE_COLUMNS)


def with_attributes(pairs: pl.LazyFrame, lake: Lake) -> pl.LazyFrame:
    """Pairs joined with their latest attributes; pairs without attributes are dropped."""
    return pairs.join(attributes(lake, pairs.select("pair_id")), on="pair_id", how="inner")


ANNOTATION_SCHEMA = {
    "pair_id": pl.String, "model": pl.String, "prompt_version": pl.String, "status": pl.String,
    "task_category": pl.String, "objectivity": pl.String, "controversiality": pl.String,
    "desired_attributes": pl.List(pl.String), "guideline": pl.String, "raw_output": pl.String, "error": pl.String,
    "attempts": pl.Int64, "tokens_in": pl.Int64, "tokens_out": pl.Int64, "label_origin": pl.String,
    "run_id": pl.String, "created_at": pl.Datetime("us", "UTC"),
}


def annotate_attributes(lake: Lake, pairs: pl.DataFrame, backend: Backend, prompt: Prompt, run_id: str, *,
                        chunk: int = 256, max_attempts: int = 3, seed: int = 0, table: str = ANNOTATIONS,
                        category_of: Callable[[dict], str | None] | None = None,
                        on_chunk: Callable[[int], None] | None = None) -> RunStats:
    """pairs: pair_id, history, chosen, rejected (+ whatever `category_of` reads for the simulated backend)."""
    stats = RunStats()
    t0 = time.perf_counter()
    done = done_keys(lake, table, backend.model_id, prompt.version, pairs)
    todo = [r for r in pairs.iter_rows(named=True) if r["pair_id"] not in done]
    stats.skipped_cached = pairs.height - len(todo)
    stats.requested = len(todo)
    cats = ", ".join(f'"{c}"' for c in TASK_CATEGORIES)
    written: list[str] = []
    for ci, part in enumerate(chunks(todo, chunk)):
        reqs = []
        for r in part:
            flip = random.Random(f"{seed}|{r['pair_id']}").random() < 0.5
            a, b = (r["rejected"], r["chosen"]) if flip else (r["chosen"], r["rejected"])
            reqs.append(Request(prompt.render(categories=cats, conversation=conversation_text(r["history"]),
                                              candidate_1=a[:3000], candidate_2=b[:3000]),
                                ATTRIBUTES_JSON_SCHEMA, n=1, temperature=0.0, seed=seed,
                                meta={"task": "attributes", "pair_id": r["pair_id"],
                                      "category": category_of(r) if category_of else None}))
        toks: list[list[int]] = []
        res = generate_validated(backend, reqs, Attributes, max_attempts, stats, toks)
        rows, answered = [], []
        for r, ((parsed, raw, err, attempts),), (t_in, t_out) in zip(part, res, toks):
            ok = stats.tally(parsed, err)
            if unavailable(err):
                continue  # no answer: nothing to record, asked again by the next run
            answered.append(r)
            a = parsed.model_dump() if ok else {}
            rows.append({"pair_id": r["pair_id"], "model": backend.model_id, "prompt_version": prompt.version,
                         "status": "ok" if ok else "failed", "task_category": a.get("task_category"),
                         "objectivity": a.get("objectivity"), "controversiality": a.get("controversiality"),
                         "desired_attributes": a.get("desired_attributes"), "guideline": a.get("guideline"),
                         "raw_output": raw, "error": err, "attempts": attempts, "tokens_in": t_in, "tokens_out": t_out,
                         "label_origin": label_origin_of(backend), "run_id": run_id, "created_at": now_utc()})
        if rows:
            cache_append(lake, table, with_parts(pl.DataFrame(rows, schema=ANNOTATION_SCHEMA), answered), written)
        if on_chunk:
            on_chunk(ci)
    compact(lake, table, written)
    stats.seconds = time.perf_counter() - t0
    stats.raise_if_unavailable(f"attributes by {backend.model_id}")
    return stats


def annotation_failures(lake: Lake, pairs: pl.DataFrame, model: str, prompt_version: str,
                        table: str = ANNOTATIONS) -> pl.DataFrame:
    """Those of `pairs` whose attributes from (model, prompt_version) failed for the pair itself (a recorded failure,
    no success): pair_id, detail (the last error), payload (the last raw output), plus whatever provenance columns
    `pairs` carries. A pair never answered (endpoint unavailable) has no row, so it is not listed: not a bad pair."""
    if pairs.height == 0 or not lake.exists(table):
        return pairs.head(0).with_columns(detail=pl.lit(None, pl.String), payload=pl.lit(None, pl.String))
    mine = (cache_scan(lake, table, parts_of(pairs)).filter((pl.col("model") == model)
                                                            & (pl.col("prompt_version") == prompt_version))
            .join(pairs.select("pair_id").lazy(), on="pair_id", how="semi"))
    ok = mine.filter(pl.col("status") == "ok").select("pair_id").unique()
    last = latest_by_key(mine, "pair_id").select("pair_id", detail="error", payload="raw_output")
    prov = [c for c in ("source", "shard", "source_row") if c in pairs.columns]
    return (pairs.lazy().select("pair_id", *prov).join(ok, on="pair_id", how="anti")
            .join(last, on="pair_id", how="inner").collect())
