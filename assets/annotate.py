"""LLM annotation assets: the five preference attributes of every pair (paper §3.2)."""

import polars as pl
from pydantic import Field

import dagster as dg
from assets.common import GPU_POOL, quarantine_pairs
from assets.ingest import raw_pairs
from pipelines.annotate.prompts import load_prompt
from pipelines.annotate.runner import ANNOTATIONS, annotate_attributes
from resources.lake import LakeResource
from resources.llm import LLMResource


class AnnotationConfig(dg.Config):
    prompt: str = Field(default="attributes_v1", description="Prompt file under pipelines/annotate/prompts")
    chunk: int = Field(default=256, description="Pairs per request batch (and per Delta upsert)")
    max_attempts: int = Field(default=3, description="Tries per pair before it is recorded as failed")
    max_failure_rate: float = Field(default=0.05, description="Check threshold on failed pairs")


@dg.asset(group_name="annotate", kinds={"deltalake", "vllm"}, deps=[raw_pairs], pool=GPU_POOL,
          check_specs=[dg.AssetCheckSpec("failure_rate", asset="llm_annotations",
                                         description="share of pairs whose attributes could not be produced")],
          description="Task category, objectivity, controversiality, desired attributes and guideline per pair, "
                      "keyed by (pair_id, model, prompt_version); resumable and cached.")
def llm_annotations(context: dg.AssetExecutionContext, config: AnnotationConfig, lake_store: LakeResource,
                    llm: LLMResource):
    lake = lake_store.lake()
    inputs = lake.input_versions(["raw_pairs"])
    pairs = lake.read("raw_pairs", columns=["pair_id", "history", "chosen", "rejected", "category_hint"])
    truth_cat = {}
    if lake.exists("synth_truth"):
        t = lake.read("synth_truth")
        truth_cat = dict(zip(t["pair_id"].to_list(), t["category"].to_list()))
    backend = llm.annotator()
    prompt = load_prompt(config.prompt)
    stats = annotate_attributes(lake, pairs, backend, prompt, context.run.run_id, chunk=config.chunk,
                                max_attempts=config.max_attempts,
                                category_of=lambda r: truth_cat.get(r["pair_id"]) or r.get("category_hint"))
    failed = (lake.read(ANNOTATIONS).filter((pl.col("status") == "failed") & (pl.col("run_id") == context.run.run_id)
                                            & (pl.col("model") == backend.model_id)))
    # nothing is lost: the pair goes to quarantine with the reason and the raw model output
    quarantine_pairs(lake, failed.select("pair_id", detail="error", payload="raw_output"), stage="annotate",
                     reason="annotation_failed", run_id=context.run.run_id)
    v = lake.version(ANNOTATIONS)
    lake.record_lineage(run_id=context.run.run_id, asset="llm_annotations", partition=None, table=ANNOTATIONS,
                        version_written=v, inputs=inputs, config=config.model_dump(),
                        counts={"ok": stats.ok, "failed": stats.failed, "cached": stats.skipped_cached})
    rate = stats.failed / max(stats.requested, 1)
    meta = stats.as_metadata()
    meta["failures_by_reason"] = dg.MetadataValue.json(meta["failures_by_reason"])
    yield dg.MaterializeResult(
        metadata={**meta, "model": backend.model_id, "prompt_version": prompt.version, "delta_version": v},
        check_results=[dg.AssetCheckResult(check_name="failure_rate", passed=rate <= config.max_failure_rate,
                                           severity=dg.AssetCheckSeverity.WARN, metadata={"rate": rate})])
