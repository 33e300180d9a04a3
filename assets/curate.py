"""Curation assets: embeddings of Stage 1's pool, the seed judgments, the Stage-1 iterations, and Stage 2.
Each is config -> one `pipelines` call -> metadata; the steps themselves live in `pipelines/curate/`."""

import time

import polars as pl
from pydantic import Field

import dagster as dg
from assets.annotate import llm_annotations
from assets.common import GPU_POOL, RMTrainConfig, judge_setup, label_origin, record_written, reward_models
from assets.meta import curve_plot, md_table, png_md
from assets.review import human_verified_seed
from pipelines.annotate.prompts import load_prompt
from pipelines.curate.judge import exemplar_index, judge_with_exemplars, judgments_of
from pipelines.curate.prepare import embed_pool
from pipelines.curate.stage1 import Stage1Config, as_stored, run_stage1
from pipelines.annotate.cost import LLMLedger, projected_pool_cost
from pipelines.curate.stage2 import (Stage2Config, Stage2Inputs, known_truth, run_stage2, stage2_pool_estimate,
                                     unit_rows_table)
from pipelines.embed import model_name
from pipelines.evaluate.gates import judge_gates
from pipelines.review.seed import SEED
from pipelines.rm.registry import best_of, latest, ref_of
from pipelines.settings import home, minilm_path
from pipelines.tables import (CURATED, EMBEDDINGS, JUDGMENTS, RAW, RECYCLED, RM_REGISTRY, SCORES, SILVER,
                              STAGE1_JUDGMENTS, STAGE1_METRICS, STAGE2_ANNOTATIONS, STAGE2_JUDGMENTS, STAGE2_UNITS,
                              SYNTH_TRUTH)
from resources.compute import ComputeResource
from resources.lake import LakeResource
from resources.llm import LLMResource
from resources.mlflow import MlflowResource
from resources.pool import PoolResource
from resources.trainer import TrainerResource


class EmbedConfig(dg.Config):
    model: str = Field(default="", description="Embedding model folder/hub id; empty = MiniLM (paper: jina-embeddings-v3)")
    max_len: int = Field(default=96, description="Tokens per embedded text")
    unit_rows: int = Field(default=50_000, description="Raw rows read at a time (the memory bound)")


@dg.asset(group_name="curation", kinds={"deltalake", "faiss"}, deps=[llm_annotations, RAW], pool=GPU_POOL,
          description="One embedding of (conversation, attributes) per pair of Stage 1's pool and model, computed "
                      "once; the ANN index for retrieval and exemplars is rebuilt from this table.")
def pair_embeddings(context: dg.AssetExecutionContext, config: EmbedConfig, lake_store: LakeResource,
                    pool: PoolResource, compute: ComputeResource):
    lake = lake_store.lake()
    model = config.model or minilm_path()
    engine = compute.make_engine(max_len=config.max_len)  # Ray actors (GPU ones when configured) or in-process
    counts = embed_pool(lake, lambda texts: engine.embed(pl.DataFrame({"text": texts}), model, config.max_len),
                        model_name(model),
                        stage1_fraction=pool.stage1_fraction, unit_rows=config.unit_rows)
    written = record_written(context, lake, "pair_embeddings", EMBEDDINGS,
                             inputs=lake.input_versions([RAW, "llm_annotations"]),
                             config={**config.model_dump(), **pool.model_dump()}, counts=counts)
    return dg.MaterializeResult(metadata={**counts, "embed_model": model_name(model), **written.metadata},
                                data_version=written.data_version)


class JudgeConfig(dg.Config):
    judge_prompt: str = Field(default="judge_v1", description="Prompt file under pipelines/annotate/prompts")
    exemplars: int = Field(default=8, description="Human-verified examples per prompt (paper: up to 8)")
    position_bias_band: list[float] = Field(default=[0.35, 0.65], description="Blocking gate: the share of "
                                            "'Candidate 1' verdicts on order-balanced pairs must lie in this band")
    min_human_agreement: float = Field(default=0.6, description="Blocking gate: the ensemble's final verdicts must "
                                                                "agree with the human seed at least this often")
    retry_failed: bool = Field(default=True, description="Re-ask samples that failed every attempt before; off: a "
                                                         "recorded failure is final (it stays counted as failed)")


JUDGE_GATES = [
    dg.AssetCheckSpec("position_bias", asset="llm_judgments", blocking=True,
                      description="share of 'Candidate 1' on pairs shown in both orders lies in the configured band"),
    dg.AssetCheckSpec("human_agreement", asset="llm_judgments", blocking=True,
                      description="the ensemble agrees with the human-verified labels at least the configured floor"),
]


@dg.asset(group_name="annotate", kinds={"deltalake", "vllm"}, deps=[human_verified_seed, pair_embeddings, SYNTH_TRUTH],
          pool=GPU_POOL, check_specs=JUDGE_GATES,
          description="Pairwise verdicts of the judge ensemble (k samples per model, seeded Candidate 1/2 order, "
                      "un-swapped) on the human-verified seed: Stage 1's silver starts from its train split, and "
                      "the blocking gates stop a judge that cannot judge (position bias, agreement with humans) "
                      "before it feeds Stage 1 or Stage 2.")
def llm_judgments(context: dg.AssetExecutionContext, config: JudgeConfig, lake_store: LakeResource,
                  llm: LLMResource):
    lake = lake_store.lake()
    judging = judge_setup(llm, config.judge_prompt, config.exemplars, config.retry_failed)
    seed = lake.read(SEED)
    exemplars = exemplar_index(lake, seed.filter(pl.col("split") != "gold_test"))
    stored = as_stored(seed)  # judged as raw_pairs stores them; exemplars show the human orientation
    ledger, t0 = LLMLedger(), time.perf_counter()
    agg = judge_with_exemplars(lake, stored, judging, exemplars, run_id=context.run.run_id, context="seed",
                               table=JUDGMENTS, on_stats=lambda st: ledger.add_usage("judge", st.usage))
    ledger.llm_seconds = time.perf_counter() - t0
    samples = judgments_of(lake, stored, judging)
    gates = judge_gates(samples, agg, seed, band=tuple(config.position_bias_band),
                        min_agreement=config.min_human_agreement)
    written = record_written(context, lake, "llm_judgments", JUDGMENTS, inputs=lake.input_versions([SEED, EMBEDDINGS]),
                             config={**config.model_dump(), "judges": judging.model_ids},
                             counts={"pairs": seed.height, "samples": samples.height})
    yield dg.MaterializeResult(data_version=written.data_version, metadata={**written.metadata,
        "pairs": seed.height, "samples": samples.height, "models": ", ".join(judging.model_ids),
        "prompt_version": judging.prompt.version, "agreement_with_humans": gates.agreement,
        "decisive_share": gates.decisive_share, "share_candidate_1": gates.share_candidate_1,
        "order_balanced_pairs": gates.balanced_pairs, "per_model": dg.MetadataValue.md(md_table(gates.per_model)),
        **llm.usage_metadata(ledger)})
    lo, hi = config.position_bias_band
    yield dg.AssetCheckResult(check_name="position_bias", passed=gates.position_ok(lo, hi),
                              metadata={"share_candidate_1": gates.share_candidate_1, "band": f"[{lo}, {hi}]",
                                        "order_balanced_pairs": gates.balanced_pairs})
    yield dg.AssetCheckResult(check_name="human_agreement", passed=gates.agreement >= config.min_human_agreement,
                              metadata={"agreement": gates.agreement, "floor": config.min_human_agreement,
                                        "decided_pairs": gates.decided_pairs})


class Stage1AssetConfig(RMTrainConfig):
    iterations: int = Field(default=2, description="Iterations to run now (continues from the last one recorded)")
    k_max: int = Field(default=8, description="Neighbours retrieved for a gold_val pair the RM gets wrong (paper: 8)")
    exemplars: int = Field(default=8, description="Human-verified examples in each judge prompt (paper: up to 8)")
    min_agree: float = Field(default=0.5, description="Vote share needed for an LLM label to join silver")
    judge_prompt: str = "judge_v1"


STAGE1_DEPS = [llm_judgments, SYNTH_TRUTH, EMBEDDINGS, SEED, RAW, "llm_annotations"]


@dg.multi_asset(
    group_name="curation", can_subset=False, pool=GPU_POOL, name="stage1",
    specs=[dg.AssetSpec(SILVER, kinds={"deltalake"}, deps=STAGE1_DEPS, description="D_silver: LLM-verified pairs (seed train split "
                        "as judged, plus every iteration's retrieved and judged pairs), oriented by the verdict"),
           dg.AssetSpec(STAGE1_METRICS, kinds={"deltalake"}, deps=STAGE1_DEPS,
                        description="One row per Stage-1 iteration"),
           dg.AssetSpec(STAGE1_JUDGMENTS, kinds={"deltalake"}, deps=STAGE1_DEPS, description="The ensemble's verdicts on the pairs "
                        "Stage 1 retrieved")],
    description="Stage 1 iterations (pipelines/curate/stage1.py): train on silver, pick by gold_val accuracy, "
                "error-driven retrieval with k = 8 if p <= 0.5 else ceil(8(1-p)), judge with human exemplars, grow "
                "silver. Each iteration writes a stage1_metrics row and MLflow runs.")
def stage1(context: dg.AssetExecutionContext, config: Stage1AssetConfig, lake_store: LakeResource,
           trainer: TrainerResource, mlflow_store: MlflowResource, llm: LLMResource, pool: PoolResource):
    lake = lake_store.lake()
    cfg = Stage1Config(iterations=config.iterations, k_max=config.k_max, min_agree=config.min_agree,
                       stage1_fraction=pool.stage1_fraction, label_origin=label_origin(llm))
    res = run_stage1(lake, cfg, reward_models(lake, config, trainer, mlflow_store),
                     judge_setup(llm, config.judge_prompt, config.exemplars), run_id=context.run.run_id,
                     log=context.log.info)
    inputs = lake.input_versions([SEED, EMBEDDINGS, "llm_annotations", JUDGMENTS])
    written = {t: record_written(context, lake, "stage1", t, inputs=inputs,
                                 config={**config.model_dump(), **pool.model_dump()},
                                 counts={"silver": res.silver_size, "iterations_run": res.iterations_run})
               for t in (SILVER, STAGE1_METRICS, STAGE1_JUDGMENTS)}
    allm = lake.read(STAGE1_METRICS).sort("iteration")
    fig = curve_plot(allm["iteration"], allm["gold_val_accuracy"], "Stage-1 iteration",
                     "gold_val accuracy (selection split)")
    yield dg.MaterializeResult(asset_key=SILVER, data_version=written[SILVER].data_version, metadata={
        "iterations_run": res.iterations_run, "silver_size": res.silver_size, **written[SILVER].metadata,
        "curve": dg.MetadataValue.md(md_table(allm.drop("created_at", "added_per_category", "run_id"))),
        "gold_val_accuracy_plot": png_md(fig)})
    yield dg.MaterializeResult(asset_key=STAGE1_METRICS, data_version=written[STAGE1_METRICS].data_version,
                               metadata={"iterations": allm.height, **written[STAGE1_METRICS].metadata})
    yield dg.MaterializeResult(asset_key=STAGE1_JUDGMENTS, data_version=written[STAGE1_JUDGMENTS].data_version,
                               metadata=written[STAGE1_JUDGMENTS].metadata)


class Stage2AssetConfig(dg.Config):
    confidence_margin: float = Field(default=0.1, description="Confident iff best-RM p > 0.5 + margin: such a pair "
                                                              "gets no attributes and no LLM call")
    unit_rows: int = Field(default=50_000, description="Pairs per work unit: the memory bound and the commit unit")
    max_len: int = Field(default=128, description="Tokens per scored conversation")
    exemplars: int = 8
    judge_prompt: str = "judge_v1"
    attributes_prompt: str = "attributes_v1"
    embed_model: str = Field(default="", description="Embedding model for exemplar retrieval; empty = MiniLM "
                                                     "(the pair_embeddings model)")
    include_stage1: bool = Field(default=True, description="Curated = Stage-1 verified data + Stage-2 survivors")
    max_llm_failure_share: float = Field(default=0.05, description="Blocking check: share of this run's LLM answers "
                                                                   "(attributes + verdicts) still invalid after every "
                                                                   "repair attempt")


STAGE2_DEPS = [SILVER, "gold_rm", "raw_pairs", SEED, EMBEDDINGS, SYNTH_TRUTH]
STAGE2_SPECS = [spec.replace_attributes(deps=STAGE2_DEPS) for spec in [
    dg.AssetSpec(SCORES, kinds={"deltalake"}, description="r_chosen, r_rejected, margin, p of every Stage-2 pool "
                 "pair under the best Stage-1 RM and the gold RM, keyed (pair_id, rm_version), per work unit"),
    dg.AssetSpec(CURATED, kinds={"deltalake"}, description="Pairs whose original label the gold RM AND (the judges "
                 "OR the best RM) agree with, plus the Stage-1 verified data: the paper's 26M subset"),
    dg.AssetSpec(RECYCLED, kinds={"deltalake"}, description="Discarded pairs with chosen/rejected swapped (the 40M "
                 "mixture); unverified"),
    dg.AssetSpec(STAGE2_UNITS, kinds={"deltalake"}, description="One row per committed work unit: counts that "
                 "reconcile (pool = curated + recycled + quarantined) and the versions that decided it"),
    dg.AssetSpec(STAGE2_ANNOTATIONS, kinds={"deltalake"}, description="Attributes of the unconfident pairs only"),
    dg.AssetSpec(STAGE2_JUDGMENTS, kinds={"deltalake"}, description="Verdicts on the unconfident pairs only"),
]]


@dg.multi_asset(
    group_name="curation", can_subset=False, pool=GPU_POOL, name="stage2", specs=STAGE2_SPECS,
    check_specs=[dg.AssetCheckSpec("counts_reconcile", asset=CURATED, blocking=True,
                                   description="every pool pair of every unit is curated, recycled or quarantined"),
                 dg.AssetCheckSpec("llm_failure_share", asset=CURATED, blocking=True,
                                   description="LLM answers invalid after every repair (quarantined attributes, "
                                               "llm=failed verdicts) stay under the configured share; unanswered "
                                               "requests never get here: their unit is not committed")],
    description="Stage 2 (pipelines/curate/stage2.py), one work unit of the raw table at a time: score under the "
                "best Stage-1 RM and the gold RM (Ray actors), annotate and judge only the unconfident, keep rule, "
                "flip-recycling; one commit per unit, resumable.")
def stage2(context: dg.AssetExecutionContext, config: Stage2AssetConfig, lake_store: LakeResource,
           llm: LLMResource, pool: PoolResource, compute: ComputeResource, mlflow_store: MlflowResource):
    lake = lake_store.lake()
    best, gold = best_of(lake, "stage1"), latest(lake, role="gold")
    if best is None or gold is None:
        raise dg.Failure("Stage 2 needs a registered Stage-1 RM and gold RM: materialize stage1 and gold_rm first")
    cache = home() / "model_cache"
    inputs = Stage2Inputs(best=ref_of(best, mlflow_store.uri, cache), gold=ref_of(gold, mlflow_store.uri, cache),
                          annotator=llm.annotator(), attributes_prompt=load_prompt(config.attributes_prompt),
                          judging=judge_setup(llm, config.judge_prompt, config.exemplars))
    cfg = Stage2Config(confidence_margin=config.confidence_margin, unit_rows=config.unit_rows,
                       stage1_fraction=pool.stage1_fraction, include_stage1=config.include_stage1,
                       embed_model=config.embed_model or minilm_path(), annotate_chunk=llm.commit_pairs)
    report = run_stage2(lake, cfg, inputs, compute.make_engine(config.max_len), run_id=context.run.run_id,
                        log=context.log.info)
    units = unit_rows_table(lake).filter(pl.col("decision_key") == report.decision_key)
    unreconciled = units.filter(pl.col("pool") != pl.col("curated") + pl.col("recycled") + pl.col("quarantined"))
    inputs_v = lake.input_versions([RAW, SILVER, SEED, RM_REGISTRY, STAGE2_JUDGMENTS])
    written = {t: record_written(context, lake, "stage2", t, inputs=inputs_v,
                                 config={**config.model_dump(), **pool.model_dump(), "engine": compute.engine},
                                 counts={k: v for k, v in report.as_dict().items() if isinstance(v, int)})
               for t in (CURATED, SCORES, RECYCLED, STAGE2_UNITS, STAGE2_ANNOTATIONS, STAGE2_JUDGMENTS)}
    meta = {**{k: v for k, v in report.as_dict().items() if isinstance(v, (int, float, bool, str))},
            "quarantined_by_reason": dg.MetadataValue.json(report.quarantined_by_reason),
            "best_rm": best["rm_version"], "gold_rm": gold["rm_version"], "engine": compute.engine}
    meta.update(known_truth(lake))
    cost = llm.pricing()
    spent = report.llm.summary(cost)["llm_cost_usd"]
    pool_estimate = stage2_pool_estimate(lake, pool.stage1_fraction)
    meta.update(llm.usage_metadata(report.llm, stage2_pool_estimate=pool_estimate,
                                   llm_cost_projected_pool_usd=projected_pool_cost(spent, report.pool, pool_estimate)))
    context.log.info(f"stage2 LLM work: {meta['llm_requests']} requests, {meta['llm_tokens_in']} + "
                     f"{meta['llm_tokens_out']} tokens, {meta['llm_failed']} failed, {meta['llm_retries']} retries, "
                     f"${spent:.2f}; whole pool (~{pool_estimate} pairs) at this rate: "
                     f"${meta['llm_cost_projected_pool_usd'] or 0:.2f}")
    why = (lake.scan(CURATED).group_by("why").len().sort("len", descending=True).collect()
           if lake.exists(CURATED) else pl.DataFrame())
    yield dg.MaterializeResult(asset_key=CURATED, data_version=written[CURATED].data_version,
                               metadata={**meta, **written[CURATED].metadata, "why": dg.MetadataValue.md(md_table(why))})
    for key in (SCORES, RECYCLED, STAGE2_UNITS, STAGE2_ANNOTATIONS, STAGE2_JUDGMENTS):
        yield dg.MaterializeResult(asset_key=key, data_version=written[key].data_version, metadata=written[key].metadata)
    answered = sum(r["ok"] + r["failed"] for r in report.llm.rows(cost))
    share = meta["llm_failed"] / answered if answered else 0.0
    yield dg.AssetCheckResult(check_name="llm_failure_share", asset_key=CURATED,
                              passed=share <= config.max_llm_failure_share,
                              metadata={"share": round(share, 4), "failed": meta["llm_failed"], "answered": answered,
                                        "max": config.max_llm_failure_share})
    yield dg.AssetCheckResult(check_name="counts_reconcile", asset_key=CURATED, passed=unreconciled.height == 0,
                              metadata={"units": units.height, "units_not_reconciling": unreconciled.height,
                                        "pool": int(units["pool"].sum()), "curated": int(units["curated"].sum()),
                                        "recycled": int(units["recycled"].sum()),
                                        "quarantined": int(units["quarantined"].sum())})


CURATE_ASSETS = [pair_embeddings, llm_judgments, stage1, stage2]
