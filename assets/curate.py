"""Curation assets: embeddings, the Stage-1 human-in-the-loop iterations, RM scores, the Stage-2 filter."""

import json
from datetime import datetime, timezone

import numpy as np
import polars as pl
from pydantic import Field

import dagster as dg
from assets.annotate import llm_annotations
from assets.common import GPU_POOL, RMTrainConfig, annotated_pool, quarantine_pairs, truth_map
from assets.meta import md_table, plt, png_md
from assets.review import human_verified_seed
from assets.rm import gold_rm
from pipelines.annotate.prompts import load_prompt
from pipelines.annotate.runner import JUDGMENTS, aggregate_judgments, judge_pairs
from pipelines.curate.embed import EMBEDDINGS, Embedder, embedding_frame, pair_text, vectors_of
from pipelines.curate.retrieve import VectorIndex
from pipelines.curate.stage1 import SILVER, exemplars_for, judged_to_silver, retrieve_for_gold
from pipelines.curate.stage2 import CURATED, RECYCLED, keep_rule, split_confident
from pipelines.review.seed import SEED
from pipelines.rm import tracking
from pipelines.rm.registry import best_of, latest, model_dir, train_and_register
from pipelines.rm.score import score_rows
from pipelines.settings import home, minilm_path
from resources.lake import LakeResource
from resources.llm import LLMResource
from resources.mlflow import MlflowResource
from resources.trainer import TrainerResource

STAGE1_METRICS = "stage1_metrics"
SCORES = "rm_scores"


class EmbedConfig(dg.Config):
    model: str = Field(default="", description="Embedding model folder/hub id; empty = MiniLM (paper: jina-embeddings-v3)")
    max_len: int = Field(default=96, description="Tokens per embedded text")
    batch_size: int = 128


@dg.asset(group_name="curation", kinds={"deltalake", "faiss"}, deps=[llm_annotations], pool=GPU_POOL,
          description="One embedding of (conversation, attributes) per pair and model, computed once; the ANN "
                      "index is rebuilt from this table.")
def pair_embeddings(context: dg.AssetExecutionContext, config: EmbedConfig, lake_store: LakeResource):
    lake = lake_store.lake()
    pool = annotated_pool(lake)
    emb = Embedder(config.model or minilm_path(), config.max_len)
    have = set()
    if lake.exists(EMBEDDINGS):
        have = set(lake.scan(EMBEDDINGS).filter(pl.col("embed_model") == emb.name).select("pair_id").collect()["pair_id"])
    todo = pool.filter(~pl.col("pair_id").is_in(list(have)))
    if todo.height:
        texts = [pair_text(r["history"], r["task_category"], r["guideline"]) for r in todo.iter_rows(named=True)]
        vecs = emb.encode(texts, config.batch_size)
        lake.upsert(EMBEDDINGS, embedding_frame(todo["pair_id"].to_list(), vecs, emb.name).to_arrow(),
                    keys=["pair_id", "embed_model"])
    return dg.MaterializeResult(metadata={"embedded": todo.height, "cached": len(have), "embed_model": emb.name,
                                          "delta_version": lake.version(EMBEDDINGS)})


def _vectors(lake, frame: pl.DataFrame) -> tuple[pl.DataFrame, np.ndarray]:
    """`frame` restricted to rows that have an embedding (order kept) and their vectors, row-aligned."""
    emb = lake.read(EMBEDDINGS).filter(pl.col("pair_id").is_in(frame["pair_id"].to_list())).unique("pair_id")
    joined = frame.join(emb.select("pair_id", "vector"), on="pair_id", how="inner", maintain_order="left")
    return joined.drop("vector"), vectors_of(joined)


class Stage1Config(RMTrainConfig):
    iterations: int = Field(default=2, description="Iterations to run now (continues from the last one recorded)")
    k_max: int = Field(default=8, description="Neighbours retrieved for a gold pair the RM gets wrong (paper: 8)")
    exemplars: int = Field(default=8, description="Human-verified examples in each judge prompt (paper: up to 8)")
    min_agree: float = Field(default=0.5, description="Vote share needed for an LLM label to join silver")
    judge_prompt: str = "judge_v1"


def _judge(lake, llm: LLMResource, pairs: pl.DataFrame, gold: pl.DataFrame, n_ex: int, run_id: str, context: str,
           prompt) -> pl.DataFrame:
    """Judge `pairs` with the ensemble, nearest gold pairs as exemplars; returns aggregate verdicts."""
    embedded, vecs = _vectors(lake, pairs)
    gold_e, gvecs = _vectors(lake, gold.select("pair_id"))
    ex = exemplars_for(embedded, vecs, gold, VectorIndex(gold_e["pair_id"].to_list(), gvecs), n_ex)
    truth = truth_map(lake)
    judge_pairs(lake, pairs, llm.backends(), prompt, run_id, samples=llm.samples, temperature=llm.temperature,
                context=context, exemplars=ex, truth_of=lambda r: truth.get(r["pair_id"]))
    j = lake.read(JUDGMENTS).filter(pl.col("pair_id").is_in(pairs["pair_id"].to_list())
                                    & (pl.col("prompt_version") == prompt.version))
    return aggregate_judgments(j)


class JudgeConfig(dg.Config):
    judge_prompt: str = Field(default="judge_v1", description="Prompt file under pipelines/annotate/prompts")
    exemplars: int = Field(default=8, description="Human-verified examples per prompt (paper: up to 8)")


@dg.asset(group_name="annotate", kinds={"deltalake", "vllm"}, deps=[human_verified_seed, pair_embeddings],
          pool=GPU_POOL,
          description="Pairwise verdicts of the judge ensemble (k samples per model, seeded Candidate 1/2 order, "
                      "un-swapped) on the human-reviewed seed pool: the D_silver view of the seed. Stage 1 and "
                      "Stage 2 append their own judgments to the same table (column `context`).")
def llm_judgments(context: dg.AssetExecutionContext, config: JudgeConfig, lake_store: LakeResource,
                  llm: LLMResource) -> dg.MaterializeResult:
    lake = lake_store.lake()
    prompt = load_prompt(config.judge_prompt)
    gold = lake.read(SEED)
    seed_pool = annotated_pool(lake, "stage1").filter(pl.col("pair_id").is_in(gold["pair_id"].to_list()))
    agg = _judge(lake, llm, seed_pool, gold, config.exemplars, context.run.run_id, "seed", prompt)
    j = lake.read(JUDGMENTS).filter(pl.col("pair_id").is_in(seed_pool["pair_id"].to_list())
                                    & (pl.col("prompt_version") == prompt.version) & (pl.col("status") == "ok"))
    # how far the judges agree with the humans, and whether the order shown sways them
    human = gold.select("pair_id", human=pl.when(pl.col("label_flipped")).then(pl.lit("rejected")).otherwise(pl.lit("chosen")))
    vs_human = agg.join(human, on="pair_id").filter(pl.col("final") != "undecidable")
    first = j.filter(pl.col("verdict_raw") != "undecidable").select((pl.col("verdict_raw") == "1").mean()).item()
    per_model = j.group_by("model").agg(samples=pl.len(), undecidable=(pl.col("prefers") == "undecidable").mean(),
                                        picks_candidate_1=(pl.col("verdict_raw") == "1").mean()).sort("model")
    lake.record_lineage(run_id=context.run.run_id, asset="llm_judgments", partition=None, table=JUDGMENTS,
                        version_written=lake.version(JUDGMENTS), inputs=lake.input_versions([SEED, EMBEDDINGS]),
                        config=config.model_dump(), counts={"pairs": seed_pool.height, "samples": j.height})
    return dg.MaterializeResult(metadata={
        "pairs": seed_pool.height, "samples": j.height, "models": ", ".join(b.model_id for b in llm.backends()),
        "prompt_version": prompt.version,
        "agreement_with_humans": float((vs_human["final"] == vs_human["human"]).mean()) if vs_human.height else 0.0,
        "decisive_share": vs_human.height / max(agg.height, 1),
        "share_candidate_1": float(first or 0.0),  # 0.5 = no position bias
        "per_model": dg.MetadataValue.md(md_table(per_model))})


@dg.asset(group_name="curation", kinds={"pytorch", "mlflow", "deltalake"},
          deps=[llm_judgments], pool=GPU_POOL,
          description="Stage 1 iterations: train on silver, pick by gold accuracy, error-driven retrieval with "
                      "k = 8 if p <= 0.5 else ceil(8(1-p)), judge with gold exemplars, grow silver. Each iteration "
                      "writes a stage1_metrics row and an MLflow run.")
def stage1(context: dg.AssetExecutionContext, config: Stage1Config, lake_store: LakeResource,
           trainer: TrainerResource, mlflow_store: MlflowResource, llm: LLMResource):
    lake = lake_store.lake()
    prompt = load_prompt(config.judge_prompt)
    gold = lake.read(SEED)  # D_gold: every human-verified pair, oriented by the human label
    silver = lake.read(SILVER) if lake.exists(SILVER) else None
    done = lake.read(STAGE1_METRICS) if lake.exists(STAGE1_METRICS) else None
    start = int(done["iteration"].max()) if done is not None and done.height else 0
    pool_all = annotated_pool(lake, "stage1")
    if silver is None or silver.height == 0:
        # iteration 0: the seed pool as the LLMs labelled it in `llm_judgments` (paper: the seed is verified into
        # D_gold by humans and into D_silver by LLMs)
        raw_seed = pool_all.filter(pl.col("pair_id").is_in(gold["pair_id"].to_list()))
        j = lake.read(JUDGMENTS).filter(pl.col("pair_id").is_in(raw_seed["pair_id"].to_list())
                                        & (pl.col("prompt_version") == prompt.version))
        agg = aggregate_judgments(j)
        silver = judged_to_silver(raw_seed, agg, 0, prompt.version, config.min_agree,
                                  "simulated" if llm.backend == "simulated" else "llm")
        lake.overwrite(SILVER, silver.to_arrow())
    curve = []
    for it in range(start + 1, start + config.iterations + 1):
        reg = train_and_register(
            lake, tracking_uri=mlflow_store.uri, experiment=mlflow_store.experiment, name="synpref-stage1-rm",
            role="stage1", backbone=config.backbone_path(), train_rows=silver.to_dicts(), val_rows=gold.to_dicts(),
            cfg=config.train_config(), out_dir=model_dir(home(), "stage1", f"{context.run.run_id}-it{it}"),
            train_fn=trainer.train, artifact_root=mlflow_store.artifacts, extra={"iteration": it})
        scored, _ = score_rows(trainer.load(reg.path), gold.to_dicts(), reg.rm_version, max_len=config.max_len)
        gold_p = gold.select("pair_id").join(scored.select("pair_id", "p"), on="pair_id", how="inner")
        used = set(gold["pair_id"]) | set(silver["pair_id"])
        if lake.exists(JUDGMENTS):
            used |= set(lake.read(JUDGMENTS).filter(pl.col("context").str.starts_with("stage1"))["pair_id"])
        pool = pool_all.filter(~pl.col("pair_id").is_in(list(used)))
        pool_e, pvecs = _vectors(lake, pool.select("pair_id"))
        gold_p, gvecs = _vectors(lake, gold_p)
        retrieved = retrieve_for_gold(gold_p, gvecs, VectorIndex(pool_e["pair_id"].to_list(), pvecs), config.k_max)
        targets = pool.filter(pl.col("pair_id").is_in(retrieved["pair_id"].unique().to_list()))
        agg = _judge(lake, llm, targets, gold, config.exemplars, context.run.run_id, f"stage1-it{it}", prompt) \
            if targets.height else aggregate_judgments(pl.DataFrame())
        new = judged_to_silver(targets, agg, it, prompt.version, config.min_agree,
                               "simulated" if llm.backend == "simulated" else "llm")
        silver = pl.concat([silver, new]).unique("pair_id", keep="first")
        lake.overwrite(SILVER, silver.to_arrow())
        per_cat = new.group_by("task_category").len().sort("task_category")
        row = {"iteration": it, "rm_version": reg.rm_version, "gold_accuracy": reg.val_accuracy,
               "gold_wrong": int((gold_p["p"] <= 0.5).sum()), "retrieved": retrieved.height,
               "judged": targets.height, "added": new.height, "silver_size": silver.height,
               "added_per_category": json.dumps(dict(per_cat.iter_rows())), "created_at": datetime.now(timezone.utc)}
        truth = truth_map(lake)
        if truth and new.height:  # project-made data: how clean is what the LLMs added?
            row["added_label_precision"] = float(np.mean([truth.get(p, True) != f for p, f in
                                                          zip(new["pair_id"], new["label_flipped"])]))
        lake.append(STAGE1_METRICS, pl.DataFrame([row]).to_arrow())
        with tracking.run(mlflow_store.uri, mlflow_store.experiment, f"stage1-iteration-{it}",
                          mlflow_store.artifacts, tags={"role": "stage1-iteration"}):
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in row.items() if isinstance(v, (int, float))}, step=it)
        curve.append(row)
        context.log.info(f"stage1 iteration {it}: gold accuracy {reg.val_accuracy:.3f}, +{new.height} silver")
    lake.record_lineage(run_id=context.run.run_id, asset="stage1", partition=str(start + config.iterations),
                        table=SILVER, version_written=lake.version(SILVER),
                        inputs=lake.input_versions([SEED, EMBEDDINGS, "llm_annotations"]),
                        config=config.model_dump(), counts={"silver": silver.height})
    allm = lake.read(STAGE1_METRICS).sort("iteration")
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(allm["iteration"], allm["gold_accuracy"], marker="o")
    ax.set_xlabel("Stage-1 iteration")
    ax.set_ylabel("gold accuracy")
    ax.grid(alpha=0.3)
    return dg.MaterializeResult(metadata={
        "iterations_run": len(curve), "silver_size": silver.height,
        "curve": dg.MetadataValue.md(md_table(allm.drop("created_at", "added_per_category"))),
        "gold_accuracy_plot": png_md(fig)})


def wild_pool(lake) -> pl.DataFrame:
    """D_wild for Stage 2: the Stage-2 share of annotated pairs, minus anything human-verified or in silver."""
    pool = annotated_pool(lake, "stage2")
    used = set(lake.read(SEED)["pair_id"]) | (set(lake.read(SILVER)["pair_id"]) if lake.exists(SILVER) else set())
    return pool.filter(~pl.col("pair_id").is_in(list(used)))


class ScoreConfig(dg.Config):
    max_len: int = 128
    batch_size: int = 64


@dg.asset(group_name="curation", kinds={"pytorch", "deltalake"}, deps=[stage1, gold_rm], pool=GPU_POOL,
          description="r_chosen, r_rejected, margin and p = σ(margin) of every Stage-2 pool pair under the best "
                      "Stage-1 RM and the gold RM, keyed by (pair_id, rm_version); only missing scores are computed.")
def rm_scores(context: dg.AssetExecutionContext, config: ScoreConfig, lake_store: LakeResource,
              trainer: TrainerResource):
    lake = lake_store.lake()
    pool = wild_pool(lake)
    meta = {}
    for role, reg in (("best_stage1", best_of(lake, "stage1")), ("gold", latest(lake, role="gold"))):
        if reg is None:
            raise dg.Failure(f"no registered {role} RM: materialize stage1 and gold_rm first")
        have = set()
        if lake.exists(SCORES):
            have = set(lake.scan(SCORES).filter(pl.col("rm_version") == reg["rm_version"]).select("pair_id")
                       .collect()["pair_id"])
        todo = pool.filter(~pl.col("pair_id").is_in(list(have)))
        if todo.height:
            scored, length = score_rows(trainer.load(reg["path"]), todo.to_dicts(), reg["rm_version"],
                                        max_len=config.max_len, batch_size=config.batch_size)
            lake.upsert(SCORES, scored.to_arrow(), keys=["pair_id", "rm_version"])
            # a response longer than max_len on its own cannot be scored: quarantined, not silently skipped
            meta[f"{role}_unscored_over_length"] = quarantine_pairs(
                lake, pl.DataFrame({"pair_id": length["unscored_ids"]}, schema={"pair_id": pl.String}).with_columns(
                    detail=pl.lit(f"response alone exceeds max_len={config.max_len} for {reg['rm_version']}"),
                    payload=pl.lit("")), stage="score", reason="over_length", run_id=context.run.run_id)
        meta[f"{role}_rm_version"] = reg["rm_version"]
        meta[f"{role}_scored_now"] = todo.height
    return dg.MaterializeResult(metadata={**meta, "pool": pool.height, "delta_version": lake.version(SCORES)})


class Stage2Config(dg.Config):
    confidence_margin: float = Field(default=0.1, description="Confident iff p > 0.5 + margin (skips LLM judging)")
    exemplars: int = 8
    judge_prompt: str = "judge_v1"
    include_stage1: bool = Field(default=True, description="Curated pool = Stage-1 verified data + Stage-2 survivors")


@dg.multi_asset(
    group_name="curation", can_subset=False, pool=GPU_POOL,
    specs=[dg.AssetSpec("curated_pairs", kinds={"deltalake"}, deps=[rm_scores],
                        description="Pairs whose original label the gold RM AND (the judges OR the best RM) agree "
                                    "with, plus the Stage-1 verified data: the paper's 26M subset."),
           dg.AssetSpec("recycled_pairs", kinds={"deltalake"}, deps=[rm_scores],
                        description="Discarded pairs with chosen/rejected swapped (the 40M mixture); unverified.")])
def stage2(context: dg.AssetExecutionContext, config: Stage2Config, lake_store: LakeResource, llm: LLMResource):
    lake = lake_store.lake()
    prompt = load_prompt(config.judge_prompt)
    best, gold_reg = best_of(lake, "stage1"), latest(lake, role="gold")
    pool = wild_pool(lake)
    scores = lake.read(SCORES)
    best_s = scores.filter(pl.col("rm_version") == best["rm_version"])
    gold_s = scores.filter(pl.col("rm_version") == gold_reg["rm_version"])
    _, unconf = split_confident(best_s.filter(pl.col("pair_id").is_in(pool["pair_id"].to_list())),
                                config.confidence_margin)
    gold = lake.read(SEED)
    to_judge = pool.filter(pl.col("pair_id").is_in(unconf["pair_id"].to_list()))
    agg = _judge(lake, llm, to_judge, gold, config.exemplars, context.run.run_id, "stage2", prompt) \
        if to_judge.height else aggregate_judgments(pl.DataFrame())
    curated, recycled = keep_rule(pool, best_s, gold_s, agg, margin=config.confidence_margin,
                                  best_version=best["rm_version"], gold_version=gold_reg["rm_version"],
                                  judge_version=prompt.version)
    curated = curated.with_columns(stage=pl.lit("stage2"))
    if config.include_stage1:
        s1 = [gold.select("pair_id", "history", "chosen", "rejected", "task_category",
                          why=pl.lit("stage1: human-verified"), stage=pl.lit("stage1"))]
        if lake.exists(SILVER):
            s1.append(lake.read(SILVER).select("pair_id", "history", "chosen", "rejected", "task_category",
                                               why=pl.lit("stage1: llm-verified"), stage=pl.lit("stage1")))
        curated = pl.concat([curated, *[x.cast({"task_category": pl.String}) for x in s1]], how="diagonal_relaxed")
        curated = curated.unique("pair_id", keep="first")
    v1 = lake.overwrite(CURATED, curated.to_arrow())
    v2 = lake.overwrite(RECYCLED, recycled.to_arrow())
    inputs = lake.input_versions([SCORES, SEED, SILVER, JUDGMENTS, "raw_pairs"])
    for t, v, n in ((CURATED, v1, curated.height), (RECYCLED, v2, recycled.height)):
        lake.record_lineage(run_id=context.run.run_id, asset=t, partition=None, table=t, version_written=v,
                            inputs=inputs, config=config.model_dump(), counts={"rows": n})
    meta = {"pool": pool.height, "unconfident_judged": to_judge.height, "kept_stage2": int((curated["stage"] == "stage2").sum()),
            "curated_total": curated.height, "recycled": recycled.height, "best_rm": best["rm_version"],
            "gold_rm": gold_reg["rm_version"]}
    truth = truth_map(lake)
    if truth:  # project-made data: report how well the filter found the wrong labels
        s2 = curated.filter(pl.col("stage") == "stage2")
        kept_right = sum(truth.get(p, True) for p in s2["pair_id"])
        dropped_wrong = sum(not truth.get(p, True) for p in recycled["pair_id"])
        all_wrong = sum(not truth.get(p, True) for p in pool["pair_id"])
        meta.update({"kept_label_precision": kept_right / max(s2.height, 1),
                     "flip_detection_precision": dropped_wrong / max(recycled.height, 1),
                     "flip_detection_recall": dropped_wrong / max(all_wrong, 1),
                     "pool_label_precision": 1 - all_wrong / max(pool.height, 1)})
    why = curated.group_by("why").len().sort("len", descending=True)
    yield dg.MaterializeResult(asset_key="curated_pairs", metadata={**meta, "delta_version": v1,
                                                                    "why": dg.MetadataValue.md(md_table(why))})
    yield dg.MaterializeResult(asset_key="recycled_pairs", metadata={"rows": recycled.height, "delta_version": v2})


CURATE_ASSETS = [pair_embeddings, llm_judgments, stage1, rm_scores, stage2]
