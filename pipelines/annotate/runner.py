"""Running attribute generation and pairwise judging over a pairs table: cached, resumable, never silently defaulted.

Results are keyed by (pair_id, model, prompt_version[, sample, sampling]) and appended to Delta chunk by chunk:
the tables are append-only (a later row for a key supersedes an earlier one, e.g. a retried failure; readers take
the latest), so a write costs the chunk, not the table, and a killed run keeps every finished chunk. Before a chunk
is asked, the keys already answered are looked up for that chunk's pairs only, so a rerun or a resumed crash
labels only what is missing (or what failed before) and the lookup never loads a whole table.
Invalid output (unparseable, off-schema, refusal) is retried with a repair prompt; after `max_attempts` the row
is recorded as failed with its reason and raw output. A request the endpoint never answered (down, rate limited
past the retry budget, malformed bodies: `Completion.transient`) is *unavailable*: nothing is written for it, and
each runner raises LLMUnavailable once it has committed what was answered, so no caller turns a missing answer into
a decision; the next run asks again. A configuration error (bad key) raises LLMConfigError from the backend.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

import polars as pl
from pydantic import BaseModel, ValidationError

from pipelines.annotate.backends import Backend, LLMUnavailable, Request
from pipelines.annotate.cache import CACHE_PART, cache_append, cache_scan, compact, part_of, parts_of
from pipelines.annotate.cost import Usage
from pipelines.annotate.prompts import Prompt
from pipelines.annotate.taxonomy import (ATTRIBUTES_SCHEMA, PRECHECK_SCHEMA, TASK_CATEGORIES, VERDICT_SCHEMA, Attributes,
                                         PreCheck, Verdict)
from pipelines.lake import Lake, latest_by_key
from pipelines.schema import LabelOrigin

from pipelines.tables import ANNOTATIONS, JUDGMENTS, PRECHECKS  # noqa: E402,F401  (re-exported)

ANNOTATION_SCHEMA = {
    "pair_id": pl.String, "model": pl.String, "prompt_version": pl.String, "status": pl.String,
    "task_category": pl.String, "objectivity": pl.String, "controversiality": pl.String,
    "desired_attributes": pl.List(pl.String), "guideline": pl.String, "raw_output": pl.String, "error": pl.String,
    "attempts": pl.Int64, "tokens_in": pl.Int64, "tokens_out": pl.Int64, "label_origin": pl.String,
    "run_id": pl.String, "created_at": pl.Datetime("us", "UTC"),
}
JUDGMENT_SCHEMA = {
    "pair_id": pl.String, "model": pl.String, "prompt_version": pl.String, "sample": pl.Int64,
    "sampling": pl.String, "context": pl.String, "order_shown": pl.String, "verdict_raw": pl.String,
    "prefers": pl.String, "rationale": pl.String, "raw_output": pl.String, "status": pl.String, "error": pl.String,
    "attempts": pl.Int64, "n_exemplars": pl.Int64, "tokens_in": pl.Int64, "tokens_out": pl.Int64,
    "label_origin": pl.String, "run_id": pl.String, "created_at": pl.Datetime("us", "UTC"),
}

REPAIR = ("\n\nYour previous answer was not valid: {error}\nAnswer again with ONLY one JSON object matching the "
          "schema, no other text.")
REFUSAL_MARKERS = ("i cannot help", "i can't help", "i'm sorry, but", "as an ai")
UNAVAILABLE = "unavailable"  # error prefix of a sample the endpoint never answered: not data, never written


@dataclass
class RunStats:
    requested: int = 0
    skipped_cached: int = 0
    ok: int = 0
    failed: int = 0
    unavailable: int = 0  # samples with no answer after the backend's retries (not written; asked again next run)
    retries: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    seconds: float = 0.0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    last_unavailable: str = ""  # the last transport error seen (for the message)
    usage: dict[str, Usage] = field(default_factory=dict)  # per model, for pricing (pipelines/annotate/cost.py)

    def tally(self, parsed: BaseModel | None, err: str | None) -> bool:
        """Count one result; failures by the reason code before the first colon. Returns whether it parsed."""
        if parsed is not None:
            self.ok += 1
            return True
        if unavailable(err):
            self.unavailable += 1
        else:
            self.failed += 1
        key = (err or "unknown").split(":")[0]
        self.failures_by_reason[key] = self.failures_by_reason.get(key, 0) + 1
        return False

    def merge(self, other: "RunStats") -> None:
        """Add another run's counts (a judge that ran in its own thread)."""
        for k in ("requested", "skipped_cached", "ok", "failed", "unavailable", "retries", "tokens_in", "tokens_out"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for k, v in other.failures_by_reason.items():
            self.failures_by_reason[k] = self.failures_by_reason.get(k, 0) + v
        self.last_unavailable = other.last_unavailable or self.last_unavailable
        for model, u in other.usage.items():
            self.usage.setdefault(model, Usage()).add(u)

    def raise_if_unavailable(self, what: str) -> None:
        """After committing what was answered: refuse to go on when some request got no answer at all."""
        if self.unavailable:
            reasons = {k: v for k, v in self.failures_by_reason.items() if k == UNAVAILABLE}
            raise LLMUnavailable(f"{what}: {self.unavailable} LLM answer(s) missing after retries ({self.last_unavailable}); "
                                 f"{self.ok} answered and kept. Nothing was recorded for the missing ones: rerun once the "
                                 f"endpoint answers ({reasons})", self)

    def as_metadata(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("usage", "last_unavailable")}
        d["pairs_per_s"] = round(self.requested / self.seconds, 2) if self.seconds else 0.0
        return d


def unavailable(err: str | None) -> bool:
    """Whether a result's error means the endpoint never answered (so nothing is known about the pair)."""
    return bool(err) and err.startswith(UNAVAILABLE)


def _parse(text: str, model: type[BaseModel]) -> tuple[BaseModel | None, str | None]:
    t = text.strip()
    if t.startswith("```"):
        t = t.strip("`").split("\n", 1)[-1]
    if not t.startswith("{") and any(m in t.lower()[:200] for m in REFUSAL_MARKERS):
        return None, "refusal"
    start, end = t.find("{"), t.rfind("}")
    if start < 0 or end < start:
        return None, "unparseable: no JSON object"
    try:
        obj = json.loads(t[start:end + 1], strict=False)  # tolerate raw control characters inside strings
    except json.JSONDecodeError as e:
        return None, f"unparseable: {e.msg}"
    try:
        return model.model_validate(obj), None
    except ValidationError as e:
        return None, "off-schema: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()[:3])


def generate_validated(backend: Backend, requests: list[Request], model: type[BaseModel], max_attempts: int,
                       stats: RunStats, tokens: list[list[int]] | None = None
                       ) -> list[list[tuple[BaseModel | None, str, str | None, int]]]:
    """For each request, n samples of (parsed | None, raw text, error, attempts). Bad samples are re-asked
    (whole request, with the repair note) until they validate or attempts run out. `tokens`, when given, receives
    [tokens_in, tokens_out] per request summed over its attempts."""
    results: list[list[Any]] = [[None] * r.n for r in requests]
    per_request = [[0, 0] for _ in requests]
    usage = stats.usage.setdefault(backend.model_id, Usage())
    usage.requests += len(requests)
    pending = list(range(len(requests)))
    attempt = 0
    current = list(requests)
    while pending and attempt < max_attempts:
        attempt += 1
        comps = backend.generate([current[i] for i in pending])
        still = []
        for i, comp in zip(pending, comps):
            stats.tokens_in += comp.tokens_in
            stats.tokens_out += comp.tokens_out
            usage.tokens_in += comp.tokens_in
            usage.tokens_out += comp.tokens_out
            per_request[i][0] += comp.tokens_in
            per_request[i][1] += comp.tokens_out
            if comp.error is not None:
                err = f"{UNAVAILABLE}: {comp.error}" if comp.transient else f"request failed: {comp.error}"
                if comp.transient:
                    stats.last_unavailable = comp.error
                for s in range(requests[i].n):
                    if results[i][s] is None or results[i][s][0] is None:
                        results[i][s] = (None, "", err, attempt)
                continue  # transport failures were already retried inside the backend
            errors = []
            for s in range(requests[i].n):
                if results[i][s] is not None and results[i][s][0] is not None:
                    continue
                text = comp.texts[s] if s < len(comp.texts) else ""
                parsed, err = _parse(text, model)
                results[i][s] = (parsed, text, err, attempt)
                if err:
                    errors.append(err)
            if errors:
                still.append(i)
                stats.retries += 1
                usage.retries += 1
                current[i] = Request(**{**requests[i].__dict__,
                                        "prompt": requests[i].prompt + REPAIR.format(error=errors[0])})
        pending = still
    for r in results:
        for sample in r:
            if sample is not None and sample[0] is not None:
                usage.ok += 1
            elif sample is not None and unavailable(sample[2]):
                usage.unavailable += 1
            else:
                usage.failed += 1
    if tokens is not None:
        tokens[:] = per_request
    return results


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _origin(backend: Backend) -> str:
    return LabelOrigin.SIMULATED.value if backend.kind == "simulated" else LabelOrigin.LLM.value


def conversation_text(history: list[dict], limit: int = 4000) -> str:
    text = "\n".join(f"[{m['role']}] {m['content']}" for m in history)
    return text if len(text) <= limit else "…" + text[-limit:]


def _with_parts(rows: pl.DataFrame, pairs: list[dict]) -> pl.DataFrame:
    """The chunk's rows with the cache block of the pair each row answers (row-aligned with `pairs`)."""
    return rows.with_columns(pl.Series(CACHE_PART, [part_of(r) for r in pairs], pl.String))


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def done_keys(lake: Lake, table: str, model: str, prompt_version: str, pairs: pl.DataFrame,
              extra: list[str] | None = None, retry_failed: bool = True) -> set:
    """Keys already answered among `pairs` only (a semi-join, bounded by the caller's chunk): status ok, or any
    recorded outcome when `retry_failed` is off (a failure after every attempt is then final). Reads only the
    cache blocks of `pairs` (pipelines/annotate/cache.py)."""
    if not lake.exists(table) or pairs.height == 0:
        return set()
    cols = ["pair_id", *(extra or [])]
    status = pl.col("status") == "ok" if retry_failed else pl.col("status").is_in(["ok", "failed"])
    df = (cache_scan(lake, table, parts_of(pairs)).filter((pl.col("model") == model) & (pl.col("prompt_version") == prompt_version)
                                  & status)
          .join(pairs.select("pair_id").unique().lazy(), on="pair_id", how="semi").select(cols).collect())
    return set(df.iter_rows()) if extra else set(df["pair_id"].to_list())


# --- attributes --------------------------------------------------------------------------------------------------
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
    for ci, part in enumerate(_chunks(todo, chunk)):
        reqs = []
        for r in part:
            flip = random.Random(f"{seed}|{r['pair_id']}").random() < 0.5
            a, b = (r["rejected"], r["chosen"]) if flip else (r["chosen"], r["rejected"])
            reqs.append(Request(prompt.render(categories=cats, conversation=conversation_text(r["history"]),
                                              candidate_1=a[:3000], candidate_2=b[:3000]),
                                ATTRIBUTES_SCHEMA, n=1, temperature=0.0, seed=seed,
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
                         "label_origin": _origin(backend), "run_id": run_id, "created_at": _now()})
        if rows:
            cache_append(lake, table, _with_parts(pl.DataFrame(rows, schema=ANNOTATION_SCHEMA), answered), written)
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


# --- batched pre-check of single responses ----------------------------------------------------------------------
PRECHECK_SCHEMA_PL = {"pair_id": pl.String, "side": pl.String, "model": pl.String, "prompt_version": pl.String,
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
                            PRECHECK_SCHEMA, n=1, temperature=0.0, max_tokens=200,
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
                     "label_origin": _origin(backend), "run_id": run_id, "created_at": _now()})
    if rows:
        written: list[str] = []
        cache_append(lake, PRECHECKS, _with_parts(pl.DataFrame(rows, schema=PRECHECK_SCHEMA_PL), answered), written)
        compact(lake, PRECHECKS, written)
    stats.seconds = time.perf_counter() - t0
    stats.raise_if_unavailable(f"pre-checks by {backend.model_id}")
    return stats


# --- pairwise judging --------------------------------------------------------------------------------------------
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
    sampling = f"t={temperature},seed={seed}"

    def one_judge(backend: Backend) -> tuple[RunStats, list[str]]:
        stats, written = RunStats(), []
        done = done_keys(lake, table, backend.model_id, prompt.version, pairs, ["sample", "sampling"], retry_failed)
        todo = [(r, s) for r in pairs.iter_rows(named=True) for s in range(samples)
                if (r["pair_id"], s, sampling) not in done]
        stats.skipped_cached += pairs.height * samples - len(todo)
        stats.requested += len(todo)

        def ask(part: list) -> tuple:
            reqs, orders = [], []
            for r, s in part:
                chosen_first = random.Random(f"{seed}|{r['pair_id']}|{s}").random() < 0.5
                orders.append(chosen_first)
                c1, c2 = (r["chosen"], r["rejected"]) if chosen_first else (r["rejected"], r["chosen"])
                ex = (exemplars or {}).get(r["pair_id"], [])
                truth = truth_of(r) if truth_of else None
                reqs.append(Request(
                    prompt.render(exemplars=format_exemplars(ex, seed), task_category=r.get("task_category") or "other",
                                  objectivity=r.get("objectivity") or "unknown",
                                  controversiality=r.get("controversiality") or "unknown",
                                  desired_attributes="; ".join(r.get("desired_attributes") or []),
                                  guideline=r.get("guideline") or "", conversation=conversation_text(r["history"]),
                                  candidate_1=c1[:4000], candidate_2=c2[:4000]),
                    VERDICT_SCHEMA, n=1, temperature=temperature, max_tokens=256, seed=seed * 1000 + s,
                    meta={"task": "judge", "pair_id": r["pair_id"], "n_exemplars": len(ex),
                          "truth_first_is_better": None if truth is None else (truth == chosen_first)}))
            st, toks = RunStats(), []  # its own counters: chunks may be asked from two threads at once
            res = generate_validated(backend, reqs, Verdict, max_attempts, st, toks)
            return part, orders, reqs, res, toks, st

        def commit(asked: tuple) -> None:
            part, orders, reqs, res, toks, st = asked
            stats.merge(st)
            rows, answered = [], []
            for (r, s), chosen_first, req, ((parsed, raw, err, attempts),), (t_in, t_out) in zip(
                    part, orders, reqs, res, toks):
                ok = stats.tally(parsed, err)
                if unavailable(err):
                    continue  # no answer: nothing to record, asked again by the next run
                answered.append(r)
                v = parsed.verdict if ok else None  # type: ignore[union-attr]
                prefers = None if v is None else ("undecidable" if v == "undecidable" else
                                                  ("chosen" if (v == "1") == chosen_first else "rejected"))
                rows.append({"pair_id": r["pair_id"], "model": backend.model_id, "prompt_version": prompt.version,
                             "sample": s, "sampling": sampling, "context": context,
                             "order_shown": "chosen_first" if chosen_first else "rejected_first", "verdict_raw": v,
                             "prefers": prefers, "rationale": parsed.rationale if ok else None,  # type: ignore[union-attr]
                             "raw_output": raw, "status": "ok" if ok else "failed", "error": err, "attempts": attempts,
                             "n_exemplars": req.meta["n_exemplars"], "tokens_in": t_in, "tokens_out": t_out,
                             "label_origin": _origin(backend), "run_id": run_id, "created_at": _now()})
            if rows:
                cache_append(lake, table, _with_parts(pl.DataFrame(rows, schema=JUDGMENT_SCHEMA), answered), written)

        # a remote endpoint gets the next chunk while the previous one finishes and commits, so its concurrency
        # stays full across chunk boundaries; an in-process engine takes one chunk at a time
        depth = 2 if getattr(backend, "kind", "") == "openai" else 1
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        in_flight: deque = deque()
        with ThreadPoolExecutor(depth, thread_name_prefix=f"ask-{backend.model_id}") as pool:
            for part in _chunks(todo, chunk):
                in_flight.append(pool.submit(ask, part))
                if len(in_flight) >= depth:
                    commit(in_flight.popleft().result())
            while in_flight:
                commit(in_flight.popleft().result())
        return stats, written

    # remote endpoints judge at the same time (each bounded by its own concurrency); in-process engines and the
    # simulated judge one after another (they share this machine's cores or GPU)
    parallel = len(backends) > 1 and all(getattr(b, "kind", "") == "openai" for b in backends)
    if parallel:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(backends), thread_name_prefix="judge") as pool:
            results = list(pool.map(one_judge, backends))
    else:
        results = [one_judge(b) for b in backends]
    written: list[str] = []
    for st, w in results:
        stats.merge(st)
        written += [p for p in w if p not in written]
    compact(lake, table, written)
    stats.seconds = time.perf_counter() - t0
    stats.raise_if_unavailable(f"verdicts by {', '.join(b.model_id for b in backends)}")
    return stats


JUDGMENT_KEYS = ["pair_id", "model", "prompt_version", "sample", "sampling"]


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
