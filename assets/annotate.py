"""LLM annotation assets: the five preference attributes (paper §3.2) of Stage 1's pool."""

import polars as pl
from pydantic import Field

import dagster as dg
from assets.common import GPU_POOL, record_written
from assets.ingest import raw_pairs
from pipelines.annotate.prompts import load_prompt
from pipelines.tables import ANNOTATIONS
from pipelines.curate.prepare import annotate_pool
from pipelines.pool import quarantine_pairs, truth_categories
from pipelines.schema import Reason
from pipelines.tables import RAW, SYNTH_TRUTH
from resources.lake import LakeResource
from resources.llm import LLMResource
from resources.pool import PoolResource


class AnnotationConfig(dg.Config):
    prompt: str = Field(default="attributes_v1", description="Prompt file under pipelines/annotate/prompts")
    chunk: int = Field(default=256, description="Pairs per request batch (and per Delta append)")
    unit_rows: int = Field(default=50_000, description="Raw rows read at a time (the memory bound)")
    max_attempts: int = Field(default=3, description="Tries per pair before it is recorded as failed")
    max_failure_rate: float = Field(default=0.05, description="Check threshold on failed pairs")


@dg.asset(group_name="annotate", kinds={"deltalake", "vllm"}, deps=[raw_pairs, SYNTH_TRUTH], pool=GPU_POOL,
          check_specs=[dg.AssetCheckSpec("failure_rate", asset="llm_annotations",
                                         description="share of pairs whose attributes could not be produced")],
          description="Task category, objectivity, controversiality, desired attributes and guideline for every "
                      "pair of Stage 1's pool (review queue, retrieval), keyed by (pair_id, model, prompt_version); "
                      "resumable and cached. Stage 2 annotates only the pairs its RMs are unsure of, itself.")
def llm_annotations(context: dg.AssetExecutionContext, config: AnnotationConfig, lake_store: LakeResource,
                    llm: LLMResource, pool: PoolResource):
    lake = lake_store.lake()
    inputs = lake.input_versions([RAW, SYNTH_TRUTH])
    backend = llm.annotator()
    prompt = load_prompt(config.prompt)

    quarantined = 0

    def on_failed(failed: pl.DataFrame) -> None:  # nothing is lost: the reason and the raw output go along
        nonlocal quarantined
        quarantined += quarantine_pairs(lake, failed, stage="annotate", reason=Reason.ANNOTATION_FAILED,
                                        run_id=context.run.run_id)

    stats = annotate_pool(lake, backend, prompt, context.run.run_id, stage1_fraction=pool.stage1_fraction,
                          unit_rows=config.unit_rows, chunk=config.chunk, max_attempts=config.max_attempts,
                          categories=(lambda pairs: truth_categories(lake, pairs)) if backend.kind == "simulated"
                          else None, on_failed=on_failed)
    written = record_written(context, lake, "llm_annotations", ANNOTATIONS, inputs=inputs,
                             config={**config.model_dump(), **pool.model_dump()},
                             counts={"ok": stats.ok, "failed": stats.failed, "cached": stats.skipped_cached})
    rate = stats.failed / max(stats.requested, 1)
    meta = stats.as_metadata()
    meta["failures_by_reason"] = dg.MetadataValue.json(meta["failures_by_reason"])
    yield dg.MaterializeResult(
        metadata={**meta, "quarantined": quarantined, "model": backend.model_id, "prompt_version": prompt.version,
                  "stage1_fraction": pool.stage1_fraction, **written.metadata},
        data_version=written.data_version,
        check_results=[dg.AssetCheckResult(check_name="failure_rate", passed=rate <= config.max_failure_rate,
                                           severity=dg.AssetCheckSeverity.WARN, metadata={"rate": rate})])
