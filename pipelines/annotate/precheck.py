"""A batched pre-check of single responses (is this response correct on its own?), for the review queue: one
request per (pair, side), keyed by (pair_id, side, model, prompt_version), cached like the other runs."""

from __future__ import annotations

import time
from typing import Callable

import polars as pl

from pipelines.annotate.backends import Backend, Request
from pipelines.annotate.cache import cache_append, compact, done_keys, with_parts
from pipelines.annotate.prompts import Prompt, conversation_text
from pipelines.annotate.taxonomy import PRECHECK_JSON_SCHEMA, PreCheck
from pipelines.annotate.validate import RunStats, generate_validated, label_origin_of, unavailable
from pipelines.lake import Lake, now_utc
from pipelines.tables import PRECHECKS

PRECHECK_SCHEMA = {"pair_id": pl.String, "side": pl.String, "model": pl.String, "prompt_version": pl.String,
                      "status": pl.String, "verdict": pl.String, "reason": pl.String, "raw_output": pl.String,
                      "error": pl.String, "label_origin": pl.String, "run_id": pl.String,
                      "created_at": pl.Datetime("us", "UTC")}


def precheck_responses(lake: Lake, pairs: pl.DataFrame, backend: Backend, prompt: Prompt, run_id: str, *,
                       max_attempts: int = 2, truth_of: Callable[[dict], bool | None] | None = None) -> RunStats:
    """One request per (pair, side): is this response correct on its own? Keyed by (pair_id, side, model,
    prompt_version); cached like the other runners. `truth_of` feeds only the simulated backend."""
    stats = RunStats()
    t0 = time.perf_counter()
    done = done_keys(lake, PRECHECKS, backend.model_id, prompt.version, pairs, ["side"])
    todo = [(r, side) for r in pairs.iter_rows(named=True) for side in ("chosen", "rejected")
            if (r["pair_id"], side) not in done]
    stats.requested = len(todo)
    reqs = []
    for r, side in todo:
        truth = truth_of(r) if truth_of else None
        reqs.append(Request(prompt.render(conversation=conversation_text(r["history"]), response=r[side][:4000]),
                            PRECHECK_JSON_SCHEMA, n=1, temperature=0.0, max_tokens=200,
                            meta={"task": "precheck", "pair_id": f"{r['pair_id']}|{side}",
                                  "response_correct": None if truth is None else (truth == (side == "chosen"))}))
    rows, answered = [], []
    for (r, side), ((parsed, raw, err, _),) in zip(todo, generate_validated(backend, reqs, PreCheck, max_attempts, stats)):
        ok = stats.tally(parsed, err)
        if unavailable(err):
            continue  # no answer: nothing to record, asked again by the next run
        answered.append(r)
        rows.append({"pair_id": r["pair_id"], "side": side, "model": backend.model_id, "prompt_version": prompt.version,
                     "status": "ok" if ok else "failed", "verdict": parsed.verdict if ok else None,  # type: ignore[union-attr]
                     "reason": parsed.reason if ok else None, "raw_output": raw, "error": err,  # type: ignore[union-attr]
                     "label_origin": label_origin_of(backend), "run_id": run_id, "created_at": now_utc()})
    if rows:
        written: list[str] = []
        cache_append(lake, PRECHECKS, with_parts(pl.DataFrame(rows, schema=PRECHECK_SCHEMA), answered), written)
        compact(lake, PRECHECKS, written)
    stats.seconds = time.perf_counter() - t0
    stats.raise_if_unavailable(f"pre-checks by {backend.model_id}")
    return stats
