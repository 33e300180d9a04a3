"""Pairwise judging by an ensemble of LLMs (paper §3.2): k samples per model per pair, the two candidates in a
seeded random order per sample, the verdict un-swapped into `prefers` relative to the pair as stored; cached and
resumable like the attributes (keyed by (pair_id, model, prompt_version, sample, sampling)); then self-consistency
(`aggregate_judgments`): majority within each model, then across models."""

from __future__ import annotations

import random
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import polars as pl

from pipelines.annotate.backends import Backend, Request
from pipelines.annotate.cache import cache_append, compact, done_keys, with_parts
from pipelines.annotate.prompts import Prompt, conversation_text
from pipelines.annotate.taxonomy import VERDICT_JSON_SCHEMA, Verdict
from pipelines.annotate.validate import RunStats, chunks, generate_validated, label_origin_of, unavailable
from pipelines.lake import Lake, latest_by_key, now_utc
from pipelines.tables import JUDGMENTS

JUDGMENT_SCHEMA = {
    "pair_id": pl.String, "model": pl.String, "prompt_version": pl.String, "sample": pl.Int64,
    "sampling": pl.String, "context": pl.String, "order_shown": pl.String, "verdict_raw": pl.String,
    "prefers": pl.String, "rationale": pl.String, "raw_output": pl.String, "status": pl.String, "error": pl.String,
    "attempts": pl.Int64, "n_exemplars": pl.Int64, "tokens_in": pl.Int64, "tokens_out": pl.Int64,
    "label_origin": pl.String, "run_id": pl.String, "created_at": pl.Datetime("us", "UTC"),
}
JUDGMENT_KEYS = ["pair_id", "model", "prompt_version", "sample", "sampling"]


def format_exemplars(exemplars: list[dict], seed: int) -> str:
    """Up to 8 human-verified pairs with their attributes and the human label, as in the paper (D.3)."""
    parts = []
    for k, e in enumerate(exemplars[:8]):
        first = random.Random(f"{seed}|ex|{e['pair_id']}").random() < 0.5
        c1, c2 = (e["chosen"], e["rejected"]) if first else (e["rejected"], e["chosen"])
        parts.append(
            f"=== Example {k + 1} (human-verified) ===\nTask category: {e.get('task_category') or 'other'}\n"
            f"Guideline: {e.get('guideline') or ''}\nConversation:\n{conversation_text(e['history'], 1200)}\n"
            f"Candidate 1:\n{c1[:800]}\nCandidate 2:\n{c2[:800]}\nBetter: Candidate {1 if first else 2}\n")
    return ("\nHuman-verified examples of this protocol applied to similar pairs:\n" + "\n".join(parts)) if parts else ""


@dataclass
class JudgeSettings:
    """What every request of one judging call shares."""

    prompt: Prompt
    run_id: str
    samples: int
    temperature: float
    seed: int
    context: str
    table: str
    retry_failed: bool
    exemplars: dict[str, list[dict]]
    chunk: int
    max_attempts: int
    truth_of: Callable[[dict], bool | None] | None

    @property
    def sampling(self) -> str:
        return f"t={self.temperature},seed={self.seed}"


class _OneJudge:
    """One model's share of a judging call: the samples not answered yet, asked chunk by chunk, each chunk
    committed to the cache as it comes back. Its own RunStats: judges may run in threads side by side."""

    def __init__(self, lake: Lake, pairs: pl.DataFrame, backend: Backend, s: JudgeSettings):
        self.lake, self.pairs, self.backend, self.s = lake, pairs, backend, s
        self.stats, self.written = RunStats(), []

    def todo(self) -> list[tuple[dict, int]]:
        s = self.s
        done = done_keys(self.lake, s.table, self.backend.model_id, s.prompt.version, self.pairs,
                         ["sample", "sampling"], s.retry_failed)
        todo = [(r, k) for r in self.pairs.iter_rows(named=True) for k in range(s.samples)
                if (r["pair_id"], k, s.sampling) not in done]
        self.stats.skipped_cached += self.pairs.height * s.samples - len(todo)
        self.stats.requested += len(todo)
        return todo

    def request(self, r: dict, k: int, chosen_first: bool) -> Request:
        s = self.s
        c1, c2 = (r["chosen"], r["rejected"]) if chosen_first else (r["rejected"], r["chosen"])
        ex = s.exemplars.get(r["pair_id"], [])
        truth = s.truth_of(r) if s.truth_of else None
        return Request(
            s.prompt.render(exemplars=format_exemplars(ex, s.seed), task_category=r.get("task_category") or "other",
                            objectivity=r.get("objectivity") or "unknown",
                            controversiality=r.get("controversiality") or "unknown",
                            desired_attributes="; ".join(r.get("desired_attributes") or []),
                            guideline=r.get("guideline") or "", conversation=conversation_text(r["history"]),
                            candidate_1=c1[:4000], candidate_2=c2[:4000]),
            VERDICT_JSON_SCHEMA, n=1, temperature=s.temperature, max_tokens=256, seed=s.seed * 1000 + k,
            meta={"task": "judge", "pair_id": r["pair_id"], "n_exemplars": len(ex),
                  "truth_first_is_better": None if truth is None else (truth == chosen_first)})

    def ask(self, part: list) -> tuple:
        orders = [random.Random(f"{self.s.seed}|{r['pair_id']}|{k}").random() < 0.5 for r, k in part]
        reqs = [self.request(r, k, first) for (r, k), first in zip(part, orders)]
        st, toks = RunStats(), []  # its own counters: chunks may be asked from two threads at once
        res = generate_validated(self.backend, reqs, Verdict, self.s.max_attempts, st, toks)
        return part, orders, reqs, res, toks, st

    def commit(self, asked: tuple) -> None:
        part, orders, reqs, res, toks, st = asked
        s, stats = self.s, self.stats
        stats.merge(st)
        rows, answered = [], []
        for (r, k), chosen_first, req, ((parsed, raw, err, attempts),), (t_in, t_out) in zip(
                part, orders, reqs, res, toks):
            ok = stats.tally(parsed, err)
            if unavailable(err):
                continue  # no answer: nothing to record, asked again by the next run
            answered.append(r)
            v = parsed.verdict if ok else None  # type: ignore[union-attr]
            prefers = None if v is None else ("undecidable" if v == "undecidable" else
                                              ("chosen" if (v == "1") == chosen_first else "rejected"))
            rows.append({"pair_id": r["pair_id"], "model": self.backend.model_id, "prompt_version": s.prompt.version,
                         "sample": k, "sampling": s.sampling, "context": s.context,
                         "order_shown": "chosen_first" if chosen_first else "rejected_first", "verdict_raw": v,
                         "prefers": prefers, "rationale": parsed.rationale if ok else None,  # type: ignore[union-attr]
                         "raw_output": raw, "status": "ok" if ok else "failed", "error": err, "attempts": attempts,
                         "n_exemplars": req.meta["n_exemplars"], "tokens_in": t_in, "tokens_out": t_out,
                         "label_origin": label_origin_of(self.backend), "run_id": s.run_id, "created_at": now_utc()})
        if rows:
            cache_append(self.lake, s.table, with_parts(pl.DataFrame(rows, schema=JUDGMENT_SCHEMA), answered),
                         self.written)

    def run(self) -> tuple[RunStats, list[str]]:
        # a remote endpoint gets the next chunk while the previous one finishes and commits, so its concurrency
        # stays full across chunk boundaries; an in-process engine takes one chunk at a time
        depth = 2 if getattr(self.backend, "kind", "") == "openai" else 1
        in_flight: deque = deque()
        with ThreadPoolExecutor(depth, thread_name_prefix=f"ask-{self.backend.model_id}") as ex:
            for part in chunks(self.todo(), self.s.chunk):
                in_flight.append(ex.submit(self.ask, part))
                if len(in_flight) >= depth:
                    self.commit(in_flight.popleft().result())
            while in_flight:
                self.commit(in_flight.popleft().result())
        return self.stats, self.written


def judge_pairs(lake: Lake, pairs: pl.DataFrame, backends: list[Backend], prompt: Prompt, run_id: str, *,
                samples: int = 3, temperature: float = 0.7, seed: int = 0, context: str = "", table: str = JUDGMENTS,
                retry_failed: bool = True,
                exemplars: dict[str, list[dict]] | None = None, chunk: int = 256, max_attempts: int = 3,
                truth_of: Callable[[dict], bool | None] | None = None) -> RunStats:
    """pairs: pair_id, history, chosen, rejected, task_category, objectivity, controversiality, desired_attributes,
    guideline. Candidates appear in a seeded random order per sample; the verdict is un-swapped into `prefers`
    (chosen | rejected | undecidable) relative to the pair as stored."""
    stats = RunStats()
    t0 = time.perf_counter()
    settings = JudgeSettings(prompt, run_id, samples, temperature, seed, context, table, retry_failed,
                             exemplars or {}, chunk, max_attempts, truth_of)
    judges = [_OneJudge(lake, pairs, b, settings) for b in backends]
    # remote endpoints judge at the same time (each bounded by its own concurrency); in-process engines and the
    # simulated judge one after another (they share this machine's cores or GPU)
    if len(backends) > 1 and all(getattr(b, "kind", "") == "openai" for b in backends):
        with ThreadPoolExecutor(len(backends), thread_name_prefix="judge") as ex:
            results = list(ex.map(_OneJudge.run, judges))
    else:
        results = [j.run() for j in judges]
    written: list[str] = []
    for st, w in results:
        stats.merge(st)
        written += [p for p in w if p not in written]
    compact(lake, table, written)
    stats.seconds = time.perf_counter() - t0
    stats.raise_if_unavailable(f"verdicts by {', '.join(b.model_id for b in backends)}")
    return stats


def aggregate_judgments(judgments: pl.DataFrame) -> pl.DataFrame:
    """Self-consistency in two steps (paper §3.2): majority of samples within each model, then majority of the
    models. Returns per pair: final (chosen | rejected | undecidable), agree_frac (share of valid samples that
    prefer the stored chosen), model_agree_frac, n_models, n_votes. Takes the latest row of each sample key
    (the table is append-only), then its successful ones."""
    empty = pl.DataFrame(schema={"pair_id": pl.String, "final": pl.String, "agree_frac": pl.Float64,
                                 "model_agree_frac": pl.Float64, "n_models": pl.UInt32, "n_votes": pl.UInt32})
    if judgments.height == 0:  # nothing judged (e.g. every pair of a unit was confident): may carry no columns
        return empty
    if "created_at" in judgments.columns and set(JUDGMENT_KEYS) <= set(judgments.columns):
        judgments = latest_by_key(judgments, JUDGMENT_KEYS)
    ok = judgments.filter(pl.col("status") == "ok")
    if ok.height == 0:
        return empty
    per_model = ok.group_by("pair_id", "model").agg(
        c=(pl.col("prefers") == "chosen").sum(), r=(pl.col("prefers") == "rejected").sum(), n=pl.len()
    ).with_columns(model_vote=pl.when(pl.col("c") > pl.col("r")).then(pl.lit("chosen"))
                   .when(pl.col("r") > pl.col("c")).then(pl.lit("rejected")).otherwise(pl.lit("undecidable")))
    agg = per_model.group_by("pair_id").agg(
        mc=(pl.col("model_vote") == "chosen").sum(), mr=(pl.col("model_vote") == "rejected").sum(),
        n_models=pl.len(), votes_c=pl.col("c").sum(), n_votes=pl.col("n").sum().cast(pl.UInt32))
    return agg.select(
        "pair_id",
        final=pl.when(pl.col("mc") > pl.col("mr")).then(pl.lit("chosen")).when(pl.col("mr") > pl.col("mc"))
        .then(pl.lit("rejected")).otherwise(pl.lit("undecidable")),
        agree_frac=pl.col("votes_c") / pl.col("n_votes"),
        model_agree_frac=pl.col("mc") / pl.col("n_models"),
        n_models=pl.col("n_models").cast(pl.UInt32), n_votes="n_votes",
    ).sort("pair_id")
