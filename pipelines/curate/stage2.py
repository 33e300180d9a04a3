"""Stage 2 (paper §3.3): the consistency filter over the in-the-wild pool, shard by shard, and flip-recycling.

Per work unit (at most `unit_rows` pairs of one raw shard, by source row):
 1. read the unit's Stage-2 pool pairs (never a verified or silver pair);
 2. score them under the best Stage-1 RM and the gold RM (the engine: in-process or Ray actors);
    pairs an RM cannot score (a response alone longer than max_len, a non-finite reward) go to quarantine;
 3. confident = best-RM p > 0.5 + margin: no attributes, no embedding, no LLM call;
 4. the unconfident get attributes, an embedding, their nearest human exemplars and the judge ensemble;
 5. keep rule: a pair keeps its ORIGINAL label iff the gold RM agrees AND (the judges agree OR the best RM agrees);
    discarded pairs are recycled with chosen/rejected swapped (the paper's 40M mixture; never verified);
 6. commit: `rm_scores`, `curated_pairs`, `recycled_pairs` each replace the unit's rows in one Delta commit, then the
    unit's row in `stage2_units` (counts, versions) marks it done.

A unit is committed only with every LLM answer its keep rule asked for: when the endpoint leaves some request
unanswered after retries (down, rate limited past the budget), the answers it gave stay cached, nothing is recorded
for the rest, the unit is not committed and the run stops with LLMUnavailable naming it; the next run continues.
Only answers that are themselves invalid after every repair become data (an annotation: quarantine; a judge: the
pair's verdict is `failed`, and the stage2 asset's blocking check bounds their share).

Memory is one unit. A rerun, or a restart after kill -9, skips units already marked done for the same decision key
(RM versions, margin, judges, prompt), and a unit cut short is redone from scratch: its rows are replaced, not
appended, so nothing is duplicated or lost. Counts reconcile per unit: pool = curated + recycled + quarantined.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import polars as pl

from pipelines.annotate.attributes import ATTRIBUTES_SCHEMA, attributes
from pipelines.annotate.backends import Backend, LLMUnavailable
from pipelines.annotate.cost import LLMLedger
from pipelines.annotate.prompts import Prompt
from pipelines.annotate.attributes import annotate_attributes, annotation_failures
from pipelines.compute import Engine
from pipelines.curate.judge import JudgeSetup, embedding_models, exemplar_index, judge_with_exemplars
from pipelines.embed import model_name, pair_text
from pipelines.lake import Lake, latest_by_key
from pipelines.pool import WorkUnit, quarantine_pairs, read_unit, truth_categories, work_units
from pipelines.rm.registry import ModelRef
from pipelines.rm.service import held_out_comparisons
from pipelines.rm.store import PairSource, SourceTable
from pipelines.schema import Reason
from pipelines.tables import (CURATED, RAW, RECYCLED, SCORES, SEED, SILVER, STAGE2_ANNOTATIONS, STAGE2_JUDGMENTS,
                             STAGE2_UNITS, SYNTH_TRUTH)

SCORE_SCHEMA = {"pair_id": pl.String, "rm_version": pl.String, "r_chosen": pl.Float64, "r_rejected": pl.Float64,
                "margin": pl.Float64, "p": pl.Float64, "work_unit": pl.String}
UNIT_SCHEMA = {"work_unit": pl.String, "decision_key": pl.String, "shard": pl.String, "row_lo": pl.Int64,
               "row_hi": pl.Int64, "pool": pl.Int64, "curated": pl.Int64, "recycled": pl.Int64,
               "quarantined": pl.Int64, "quarantined_by_reason": pl.String, "confident": pl.Int64,
               "annotated": pl.Int64, "judged": pl.Int64, "best_rm_version": pl.String,
               "gold_rm_version": pl.String, "seconds": pl.Float64, "run_id": pl.String,
               "done_at": pl.Datetime("us", "UTC")}
STAGE1_UNIT = "stage1"  # the work unit holding the Stage-1 verified data in curated_pairs


def split_confident(scores: pl.DataFrame, margin: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    conf = pl.col("p") > 0.5 + margin
    return scores.filter(conf), scores.filter(~conf)


def keep_rule(pool: pl.DataFrame, best: pl.DataFrame, gold: pl.DataFrame, llm: pl.DataFrame, *, margin: float,
              best_version: str, gold_version: str, judge_version: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """pool: pair_id, history, chosen, rejected (+ task_category). best/gold: rm_scores (pair_id, p).
    llm: aggregate_judgments (pair_id, final, agree_frac) for the unconfident pairs.
    Returns (curated, recycled) with the reason and the versions that decided each row."""
    df = (pool.join(best.select("pair_id", p_best="p"), on="pair_id", how="inner")
          .join(gold.select("pair_id", p_gold="p"), on="pair_id", how="inner")
          .join(llm.select("pair_id", llm_final="final", llm_agree="agree_frac"), on="pair_id", how="left"))
    confident = pl.col("p_best") > 0.5 + margin
    gold_ok = pl.col("p_gold") > 0.5
    rm_ok = pl.col("p_best") > 0.5
    llm_ok = pl.col("llm_final") == "chosen"
    df = df.with_columns(confident=confident, gold_agrees=gold_ok, rm_agrees=rm_ok,
                         llm_agrees=llm_ok.fill_null(False), judged=pl.col("llm_final").is_not_null())
    keep = pl.col("gold_agrees") & (pl.col("llm_agrees") | pl.col("rm_agrees"))
    why = pl.concat_str([
        pl.when(pl.col("confident")).then(pl.lit("confident")).otherwise(pl.lit("unconfident")),
        pl.when(pl.col("gold_agrees")).then(pl.lit("gold=agree")).otherwise(pl.lit("gold=disagree")),
        pl.when(pl.col("rm_agrees")).then(pl.lit("rm=agree")).otherwise(pl.lit("rm=disagree")),
        pl.when(~pl.col("judged")).then(pl.lit("llm=not-asked")).when(pl.col("llm_agrees")).then(pl.lit("llm=agree"))
        .otherwise(pl.lit("llm=") + pl.col("llm_final").fill_null("none")),
    ], separator=" ")
    df = df.with_columns(why=why, best_rm_version=pl.lit(best_version), gold_rm_version=pl.lit(gold_version),
                         judge_version=pl.when(pl.col("judged")).then(pl.lit(judge_version)).otherwise(None))
    cols = ["pair_id", "history", "chosen", "rejected", "p_best", "p_gold", "llm_final", "llm_agree", "why",
            "best_rm_version", "gold_rm_version", "judge_version"]
    for extra in ("margin", "task_category"):
        if extra in df.columns:
            cols.insert(4, extra)
    curated = df.filter(keep).select(cols)
    recycled = (df.filter(~keep).select(cols)
                .with_columns(chosen=pl.col("rejected"), rejected=pl.col("chosen"), why="flipped: " + pl.col("why")))
    return curated, recycled


@dataclass
class Stage2Config:
    confidence_margin: float = 0.1  # confident iff best-RM p > 0.5 + margin
    unit_rows: int = 50_000  # pairs per work unit (the memory bound)
    stage1_fraction: float = 0.4  # pairs hashed below it belong to Stage 1's pool, the rest to Stage 2's
    include_stage1: bool = True  # curated = Stage-1 verified data (human train split + silver) + Stage-2 survivors
    embed_model: str = ""  # embedding model folder for the unconfident pairs' exemplar retrieval
    annotate_chunk: int = 256  # pairs per Delta commit of attributes (what a crash can lose)


@dataclass
class Stage2Inputs:
    """The models and LLMs Stage 2 runs with."""

    best: ModelRef
    gold: ModelRef
    annotator: Backend
    attributes_prompt: Prompt
    judging: JudgeSetup


@dataclass
class Stage2Report:
    units_total: int = 0
    units_skipped: int = 0  # already committed under the same decision key
    units_run: int = 0
    pool: int = 0
    curated: int = 0
    recycled: int = 0
    quarantined: int = 0
    confident: int = 0
    annotated: int = 0
    judged: int = 0
    stage1_rows: int = 0
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    max_unit_rows: int = 0
    seconds: float = 0.0
    decision_key: str = ""
    step_seconds: dict[str, float] = field(default_factory=lambda: {"read_score": 0.0, "annotate_judge": 0.0,
                                                                     "keep_commit": 0.0})
    llm: LLMLedger = field(default_factory=LLMLedger)  # requests/tokens per task and model, priced by the caller

    @property
    def reconciles(self) -> bool:
        return self.pool == self.curated + self.recycled + self.quarantined

    @property
    def skipped_annotation_share(self) -> float:
        """Share of the pool decided without any LLM call (confident pairs)."""
        return self.confident / self.pool if self.pool else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "reconciles": self.reconciles,
                "skipped_annotation_share": round(self.skipped_annotation_share, 4)}


def decision_key(cfg: Stage2Config, inputs: Stage2Inputs) -> str:
    """Everything that decides a unit's rows: a unit done under another key is recomputed."""
    blob = json.dumps({"best": inputs.best.rm_version, "gold": inputs.gold.rm_version,
                       "margin": cfg.confidence_margin, "stage1_fraction": cfg.stage1_fraction,
                       "judges": inputs.judging.model_ids, "prompt": inputs.judging.prompt.version,
                       "samples": inputs.judging.samples, "sampling": inputs.judging.sampling,
                       "exemplars": inputs.judging.exemplars, "attributes": inputs.attributes_prompt.version,
                       "annotator": inputs.annotator.model_id, "unit_rows": cfg.unit_rows,
                       "embed_model": cfg.embed_model}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def done_units(lake: Lake, key: str) -> set[str]:
    """Names of the units committed under `key` (one row per unit: bounded by the number of units)."""
    if not lake.exists(STAGE2_UNITS):
        return set()
    return set(lake.scan(STAGE2_UNITS).filter(pl.col("decision_key") == key).select("work_unit").collect()
               ["work_unit"].to_list())


def stage2_exemplars(lake: Lake, embed_model: str):
    """The exemplar index Stage 2 retrieves from. Stage 2 embeds its queries with `embed_model`, so the exemplars
    must have been embedded by that same model (`pair_embeddings`); a mismatch is refused, never mixed."""
    pool = exemplar_pool(lake)
    if not embed_model:
        return exemplar_index(lake, pool)
    name = model_name(embed_model)
    have = embedding_models(lake, pool)
    if have and name not in have:
        raise ValueError(f"Stage 2 embeds with {name!r} but the exemplars were embedded by {have}: set Stage 2's "
                         f"embed_model to that model, or materialize pair_embeddings with {name!r}")
    return exemplar_index(lake, pool, name)


def run_stage2(lake: Lake, cfg: Stage2Config, inputs: Stage2Inputs, engine: Engine, *, run_id: str,
               on_unit: Callable[[dict], None] | None = None, log: Callable[[str], None] = lambda m: None
               ) -> Stage2Report:
    """Stage 2 over every work unit not yet committed under the current decision key."""
    t0 = time.perf_counter()
    report = Stage2Report(decision_key=decision_key(cfg, inputs))
    units = work_units(lake, cfg.unit_rows)
    done = done_units(lake, report.decision_key)
    report.units_total = len(units)
    exemplars = stage2_exemplars(lake, cfg.embed_model)
    pending = [u for u in units if u.name not in done]
    report.units_skipped = len(units) - len(pending)
    reader = UnitRead(lake.root, lake.storage_options, cfg.stage1_fraction)
    scored = iter(engine.score_units(pending, reader, {"best": inputs.best, "gold": inputs.gold}))
    while True:
        t = time.perf_counter()
        got = next(scored, None)  # the time the driver waits on the engine: reading and scoring not yet overlapped
        report.step_seconds["read_score"] += time.perf_counter() - t
        if got is None:
            break
        unit, pairs, scores = got
        try:
            row = _run_unit(lake, cfg, inputs, engine, unit, pairs, scores, exemplars, report.decision_key, run_id,
                            report.step_seconds, report.llm)
        except LLMUnavailable as e:  # the unit lacks LLM answers its keep rule needs: not committed, run stops
            left = len(pending) - report.units_run
            raise LLMUnavailable(
                f"stage2 unit {unit.name} NOT committed, the run stops: {report.units_run} unit(s) committed this run, "
                f"{left} not committed (this one included); the next run continues with them. Cause: {e}",
                e.stats) from e
        for k in ("pool", "curated", "recycled", "quarantined", "confident", "annotated", "judged"):
            setattr(report, k, getattr(report, k) + row[k])
        for reason, n in json.loads(row["quarantined_by_reason"]).items():
            report.quarantined_by_reason[reason] = report.quarantined_by_reason.get(reason, 0) + n
        report.max_unit_rows = max(report.max_unit_rows, row["pool"])
        report.units_run += 1
        log(f"stage2 {unit.name}: {row['pool']} pairs -> {row['curated']} kept, {row['recycled']} recycled, "
            f"{row['quarantined']} quarantined ({row['confident']} confident, {row['judged']} judged)")
        if on_unit:
            on_unit(row)
    if cfg.include_stage1:
        report.stage1_rows = write_stage1_verified(lake)
    report.seconds = time.perf_counter() - t0
    return report


def stage2_pool_estimate(lake: Lake, stage1_fraction: float) -> int:
    """Pairs in Stage 2's pool over the whole raw table, estimated from the row count (the pool is a hash share;
    reading each id's hash to count exactly would scan the table for a projection)."""
    if not lake.exists(RAW):
        return 0
    return round(lake.scan(RAW).select(pl.len()).collect().item() * (1 - stage1_fraction))


def exemplar_pool(lake: Lake) -> pl.DataFrame:
    """Human-verified pairs that may be shown to the judges: the train and gold_val splits, never gold_test."""
    if not lake.exists(SEED):
        return pl.DataFrame(schema={"pair_id": pl.String})
    return lake.scan(SEED).filter(pl.col("split") != "gold_test").collect()


@dataclass(frozen=True)
class UnitRead:
    """Reads a work unit's Stage-2 pool pairs; picklable, so Ray workers read their units themselves."""

    root: str
    storage_options: dict
    stage1_fraction: float

    def __call__(self, unit: WorkUnit) -> pl.DataFrame:
        return read_unit(Lake(self.root, dict(self.storage_options)), unit, "stage2", self.stage1_fraction)


def _run_unit(lake: Lake, cfg: Stage2Config, inputs: Stage2Inputs, engine: Engine, unit: WorkUnit,
              pairs: pl.DataFrame, scores: dict[str, pl.DataFrame], exemplars, key: str, run_id: str,
              steps: dict[str, float], ledger: LLMLedger) -> dict:
    """Steps 2-6 for one unit whose pairs the engine has read and scored (`steps` accumulates seconds per step)."""
    t0 = time.perf_counter()
    best, gold = scores["best"], scores["gold"]
    # 2. what an RM cannot score is quarantined with the reason, under either RM
    unscorable = pl.concat([s.filter(pl.col("status") != "ok").select(
        "pair_id", reason="status", detail=pl.col("detail") + pl.lit(f" ({ref.rm_version})"))
        for s, ref in ((best, inputs.best), (gold, inputs.gold))]).unique("pair_id", keep="first")
    by_reason: dict[str, int] = {}
    for reason, grp in unscorable.group_by("reason"):
        bad = pairs.join(grp, on="pair_id").with_columns(payload=pl.lit(""))
        by_reason[reason[0]] = quarantine_pairs(lake, bad, stage="score", reason=reason[0], run_id=run_id)
    ok = pairs.join(unscorable.select("pair_id"), on="pair_id", how="anti")
    best_ok, gold_ok = (s.filter(pl.col("status") == "ok") for s in (best, gold))
    # 3. confident pairs need nothing more; 4. the unconfident get attributes, an embedding and the judges
    confident, unconfident = split_confident(best_ok.join(ok.select("pair_id"), on="pair_id", how="semi"),
                                             cfg.confidence_margin)
    unconf = ok.join(unconfident.select("pair_id"), on="pair_id", how="semi")
    annotated, failed = _annotate(lake, unconf, inputs, run_id, cfg.annotate_chunk, ledger)
    if failed.height:
        by_reason[Reason.ANNOTATION_FAILED.value] = quarantine_pairs(
            lake, failed, stage="annotate", reason=Reason.ANNOTATION_FAILED, run_id=run_id)
    vectors = None
    if annotated.height and cfg.embed_model:
        texts = annotated.select(text=pl.struct("history", "task_category", "guideline").map_elements(
            lambda r: pair_text(r["history"], r["task_category"], r["guideline"]), return_dtype=pl.String))
        vectors = engine.embed(texts, cfg.embed_model)
    agg = judge_with_exemplars(lake, annotated, inputs.judging, exemplars, run_id=run_id, context="stage2",
                               table=STAGE2_JUDGMENTS, vectors=vectors,
                               on_stats=lambda st: ledger.add_usage("judge", st.usage))
    # every judged pair has all its samples answered here (judge_pairs raised otherwise); one whose every answer
    # was invalid is marked llm=failed, never llm=not-asked
    agg = annotated.select("pair_id").join(agg, on="pair_id", how="left").with_columns(
        final=pl.col("final").fill_null("failed"))
    t1 = time.perf_counter()
    steps["annotate_judge"] += t1 - t0
    ledger.llm_seconds += t1 - t0
    # 5. keep rule over every scored pair that was not quarantined
    decided = ok.join(failed.select("pair_id"), on="pair_id", how="anti").join(
        annotated.select("pair_id", "task_category"), on="pair_id", how="left")
    curated, recycled = keep_rule(decided, best_ok, gold_ok, agg, margin=cfg.confidence_margin,
                                  best_version=inputs.best.rm_version, gold_version=inputs.gold.rm_version,
                                  judge_version=inputs.judging.prompt.version)
    # 6. one commit per table for the unit, then the unit's row (the resume marker) last
    stamp = dict(stage=pl.lit("stage2"), work_unit=pl.lit(unit.name))
    scored_rows = pl.concat([s.join(pairs.select("pair_id"), on="pair_id", how="semi").filter(
        pl.col("status") == "ok").select("pair_id", rm_version=pl.lit(ref.rm_version), r_chosen="r_chosen",
                                         r_rejected="r_rejected", margin="margin", p="p",
                                         work_unit=pl.lit(unit.name))
        for s, ref in ((best, inputs.best), (gold, inputs.gold))]).cast(SCORE_SCHEMA)
    # rows of units cut another way (a different unit_rows) that overlap this one go in the same commit: a pair
    # is never kept twice, nor skipped, when the unit size changes
    names = [unit.name, *overlapping_units(lake, unit)]
    lake.replace_where(SCORES, scored_rows.to_arrow(), "work_unit", names)
    lake.replace_where(CURATED, _curated_frame(curated.with_columns(**stamp)).to_arrow(), "work_unit", names)
    lake.replace_where(RECYCLED, _curated_frame(recycled.with_columns(**stamp)).to_arrow(), "work_unit", names)
    quarantined = sum(by_reason.values())
    row = {"work_unit": unit.name, "decision_key": key, "shard": unit.shard, "row_lo": unit.lo, "row_hi": unit.hi,
           "pool": pairs.height, "curated": curated.height, "recycled": recycled.height, "quarantined": quarantined,
           "quarantined_by_reason": json.dumps(by_reason, sort_keys=True), "confident": confident.height,
           "annotated": annotated.height + failed.height, "judged": annotated.height,
           "best_rm_version": inputs.best.rm_version, "gold_rm_version": inputs.gold.rm_version,
           "seconds": time.perf_counter() - t0, "run_id": run_id, "done_at": datetime.now(timezone.utc)}
    lake.append(STAGE2_UNITS, pl.DataFrame([row], schema=UNIT_SCHEMA).to_arrow())
    steps["keep_commit"] += time.perf_counter() - t1
    return row


def _annotate(lake: Lake, unconf: pl.DataFrame, inputs: Stage2Inputs, run_id: str,
              chunk: int, ledger: LLMLedger) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Attributes for the unconfident pairs only. Returns (pairs with attributes, failed: pair_id/detail/payload
    with provenance)."""
    if unconf.height == 0:
        empty = unconf.select("pair_id", "source", "shard", "source_row").with_columns(
            detail=pl.lit(None, pl.String), payload=pl.lit(None, pl.String))
        return unconf.head(0).join(pl.DataFrame(schema=ATTRIBUTES_SCHEMA), on="pair_id"), empty
    cats = truth_categories(lake, unconf)
    st = annotate_attributes(lake, unconf, inputs.annotator, inputs.attributes_prompt, run_id,
                             table=STAGE2_ANNOTATIONS, chunk=chunk,
                             category_of=lambda r: cats.get(r["pair_id"]) or r.get("category_hint"))
    ledger.add_usage("attributes", st.usage)
    attrs = attributes(lake, unconf, table=STAGE2_ANNOTATIONS).collect()
    annotated = unconf.join(attrs, on="pair_id", how="inner")
    failed = annotation_failures(lake, unconf.join(attrs.select("pair_id"), on="pair_id", how="anti"),
                                 inputs.annotator.model_id, inputs.attributes_prompt.version, STAGE2_ANNOTATIONS)
    return annotated, failed


CURATED_SCHEMA = {"pair_id": pl.String, "history": pl.List(pl.Struct({"role": pl.String, "content": pl.String})),
                  "chosen": pl.String, "rejected": pl.String, "task_category": pl.String, "p_best": pl.Float64,
                  "p_gold": pl.Float64, "llm_final": pl.String, "llm_agree": pl.Float64, "why": pl.String,
                  "best_rm_version": pl.String, "gold_rm_version": pl.String, "judge_version": pl.String,
                  "stage": pl.String, "work_unit": pl.String, "margin": pl.Float64}


def _curated_frame(df: pl.DataFrame) -> pl.DataFrame:
    """Rows in the curated/recycled schema (columns a source lacks are null)."""
    return df.select([(pl.col(c) if c in df.columns else pl.lit(None)).cast(t).alias(c)
                      for c, t in CURATED_SCHEMA.items()])


def write_stage1_verified(lake: Lake) -> int:
    """The Stage-1 verified data into curated_pairs as work unit 'stage1': the human train split (never gold_val
    or gold_test: those select and report models) and every silver pair. Replaced on every run."""
    parts = []
    if lake.exists(SEED):
        parts.append(lake.scan(SEED).filter(pl.col("split") == "train").select(
            "pair_id", "history", "chosen", "rejected", "task_category", why=pl.lit("stage1: human-verified")))
    if lake.exists(SILVER):
        parts.append(lake.scan(SILVER).select("pair_id", "history", "chosen", "rejected", "task_category",
                                              why=pl.lit("stage1: llm-verified")))
    if not parts:
        return 0
    rows = pl.concat([p.with_columns(pl.col("task_category").cast(pl.String)) for p in parts]).unique(
        "pair_id", keep="first").collect()
    frame = _curated_frame(rows.with_columns(stage=pl.lit("stage1"), work_unit=pl.lit(STAGE1_UNIT)))
    lake.replace_where(CURATED, frame.to_arrow(), "work_unit", STAGE1_UNIT)
    return frame.height


def overlapping_units(lake: Lake, unit) -> list[str]:
    """Committed units of the same shard whose row range overlaps `unit`'s under another name (another unit_rows).
    Reads the unit table (one row per committed unit)."""
    if not lake.exists(STAGE2_UNITS):
        return []
    # a name is reused by a unit cut another way: its last range counts
    latest = latest_by_key(lake.scan(STAGE2_UNITS).filter(pl.col("shard") == unit.shard), "work_unit", "done_at")
    return (latest.filter((pl.col("row_lo") < unit.hi) & (pl.col("row_hi") > unit.lo)
                          & (pl.col("work_unit") != unit.name))
            .select("work_unit").collect()["work_unit"].sort().to_list())


def unit_rows_table(lake: Lake) -> pl.DataFrame:
    """The latest row per committed unit (for reports); a unit since replaced by an overlapping one cut another way
    is left out."""
    if not lake.exists(STAGE2_UNITS):
        return pl.DataFrame(schema=UNIT_SCHEMA)
    latest = latest_by_key(lake.scan(STAGE2_UNITS), "work_unit", "done_at").collect()
    later = latest.join(latest.select("shard", lo2="row_lo", hi2="row_hi", at2="done_at", name2="work_unit"),
                        on="shard").filter((pl.col("lo2") < pl.col("row_hi")) & (pl.col("hi2") > pl.col("row_lo"))
                                           & (pl.col("name2") != pl.col("work_unit"))
                                           & (pl.col("at2") > pl.col("done_at")))
    return latest.join(later.select("work_unit").unique(), on="work_unit", how="anti").sort("done_at")


def training_mix(lake: Lake, root: Path, include_recycled: bool = False) -> tuple[PairSource, pl.DataFrame]:
    """The RM family's data, as a token-store source: curated_pairs (+ recycled_pairs, the 40M mix) at their
    current versions (pinned in the source, so the store and the run name exactly what they read), minus every
    gold_val and gold_test comparison in either orientation; and gold_val (checkpoint selection, in memory).
    gold_test stays for the report only. Nothing is collected here: the store's build tasks read the tables'
    files in parallel. Curated and recycled rows are disjoint by construction (Stage 2 decides each raw pair once:
    kept, flipped, or neither)."""
    tables = [SourceTable(lake.uri(CURATED), lake.version(CURATED), lake.storage_options)]
    if include_recycled and lake.exists(RECYCLED):  # flipped pairs keep the source's margin: it is still a gap
        tables.append(SourceTable(lake.uri(RECYCLED), lake.version(RECYCLED), lake.storage_options))
    val = lake.scan(SEED).filter(pl.col("split") == "gold_val").select("pair_id", "history", "chosen",
                                                                      "rejected").collect()
    return PairSource(tables, exclude=str(held_out_comparisons(lake, root))), val


def known_truth(lake: Lake) -> dict:
    """Project-made data carries its truth: how well did the filter find the wrong labels? Aggregated by polars
    joins over the Stage-2 rows (no per-pair Python)."""
    if not lake.exists(SYNTH_TRUTH) or not lake.exists(CURATED):
        return {}
    truth = lake.scan(SYNTH_TRUTH).select("pair_id", "label_correct")
    kept = lake.scan(CURATED).filter(pl.col("stage") == "stage2").select("pair_id").join(truth, on="pair_id")
    rec = lake.scan(RECYCLED).select("pair_id").join(truth, on="pair_id")
    scored = lake.scan(SCORES).select("pair_id").unique().join(truth, on="pair_id")
    k = kept.select(n=pl.len(), right=pl.col("label_correct").sum()).collect().row(0, named=True)
    r = rec.select(n=pl.len(), wrong=(~pl.col("label_correct")).sum()).collect().row(0, named=True)
    s = scored.select(n=pl.len(), wrong=(~pl.col("label_correct")).sum()).collect().row(0, named=True)
    if not s["n"]:
        return {}
    return {"kept_label_precision": (k["right"] or 0) / max(k["n"], 1),
            "flip_detection_precision": (r["wrong"] or 0) / max(r["n"], 1),
            "flip_detection_recall": (r["wrong"] or 0) / max(s["wrong"] or 0, 1),
            "pool_label_precision": 1 - (s["wrong"] or 0) / s["n"]}
