"""One object for "train, register, fetch and score an RM", built by the assets from their resources and handed
to the curation loops (which only see the `RewardModels` protocol of `pipelines.curate.stage1`).

Training always goes through a token store: a `PairSource` (Delta tables at pinned versions, or Parquet files) is
tokenized once per (inputs, tokenizer, max_len, length policy) and reused; a DataFrame (Stage 1's silver set, the
seed) is first written to a content-addressed Parquet file, so the same frame maps to the same store. The model
folder is keyed by (data, backbone, training config), not by the run: re-executing a training after a crash
resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import polars as pl

from pipelines.lake import Lake
from pipelines.schema import HISTORY_DTYPE
from pipelines.tables import SEED
from pipelines.rm.registry import REGISTRY, ModelRef, RegisteredRM, ref_of, train_and_register
from pipelines.rm.store import PairSource, SourceTable, StoreBuild, build_token_store
from pipelines.rm.train import TrainConfig, TrainResult

TRAIN_COLUMNS = ["pair_id", "history", "chosen", "rejected"]


def frame_source(df: pl.DataFrame, root: Path) -> PairSource:
    """A DataFrame of pairs as a Parquet file named by its content (same frame, same file, same store)."""
    cols = [c for c in (*TRAIN_COLUMNS, "margin", "rejected_more") if c in df.columns]
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{uuid.uuid4().hex}.parquet"
    df.select(cols).write_parquet(tmp)
    h = hashlib.sha256(tmp.read_bytes()).hexdigest()[:20]
    dst = root / f"{h}.parquet"
    if dst.exists():
        tmp.unlink()
    else:
        os.replace(tmp, dst)
    return PairSource([SourceTable(str(dst))])


def held_out_comparisons(lake: Lake, root: Path) -> Path:
    """A Parquet file of the comparison ids of every gold_val and gold_test pair (either orientation), named by
    its content: every training set of every RM (gold, Stage 1, the family) leaves these comparisons out, so a
    flipped twin of a reported pair from another source is never trained on. Seed-sized."""
    from pipelines.schema import comparison_ids

    held = (lake.scan(SEED).filter(pl.col("split") != "train").select("history", "chosen", "rejected").collect()
            if lake.exists(SEED) else pl.DataFrame(schema={"history": HISTORY_DTYPE, "chosen": pl.String,
                                                           "rejected": pl.String}))
    ids = pl.DataFrame({"comparison_id": comparison_ids(held)}, schema={"comparison_id": pl.String}).unique().sort(
        "comparison_id")
    root.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256("\n".join(ids["comparison_id"].to_list()).encode()).hexdigest()[:20]
    path = root / f"held-out-{digest}.parquet"
    if not path.exists():
        tmp = root / f".{digest}.{os.getpid()}.parquet"
        ids.write_parquet(tmp)
        os.replace(tmp, path)
    return path


def output_key(name: str, backbone: str, data_key: str, cfg: TrainConfig) -> str:
    """The model folder of a training: the same data, backbone and settings (progress display and attention
    kernel aside) resume."""
    c = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "attn_implementation")}
    blob = json.dumps([name, backbone, data_key, c], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class MlflowRewardModels:
    lake: Lake
    tracking_uri: str
    experiment: str
    artifact_root: str | None
    home: Path
    backbone: str
    cfg: TrainConfig
    train_fn: Callable[..., TrainResult]  # (backbone, store, val_rows, cfg, out_dir, log) -> TrainResult
    load_fn: Callable[[str], object]  # local folder -> RewardModel on the configured device
    score_batch_size: int = 64
    store_root: Path | None = None  # default <home>/token_store
    build_parallel: str = "auto"  # ray | inprocess | auto
    on_build: Callable[[StoreBuild], None] | None = None
    _loaded: dict = field(default_factory=dict, repr=False)

    @property
    def cache_root(self) -> Path:
        return self.home / "model_cache"

    def token_store(self, train: PairSource | pl.DataFrame) -> StoreBuild:
        source = train if isinstance(train, PairSource) else frame_source(train, self.home / "mixes")
        if source.exclude is None:  # no RM trains on a gold_val/gold_test comparison, in either orientation
            source = replace(source, exclude=str(held_out_comparisons(self.lake, self.home / "mixes")))
        build = build_token_store(source, self.backbone, self.store_root or self.home / "token_store",
                                  max_len=self.cfg.max_len, policy=self.cfg.length_policy,
                                  parallel=self.build_parallel)
        if self.on_build:
            self.on_build(build)
        return build

    def train(self, *, name: str, role: str, train: PairSource | pl.DataFrame, val: pl.DataFrame,
              extra: dict | None = None) -> RegisteredRM:
        build = self.token_store(train)
        out = self.home / "models" / name.removeprefix("synpref-") / output_key(name, self.backbone, build.key, self.cfg)
        out.mkdir(parents=True, exist_ok=True)
        counts = build.counts
        return train_and_register(
            self.lake, tracking_uri=self.tracking_uri, experiment=self.experiment, name=name, role=role,
            backbone=self.backbone, train=build.store, val_rows=val.select(TRAIN_COLUMNS).to_dicts(), cfg=self.cfg,
            out_dir=str(out), train_fn=self.train_fn, artifact_root=self.artifact_root,
            extra={**(extra or {}), "data_key": build.key, "store_reused": build.reused,
                   "store_held_out": counts.get("held_out", 0), "store_refused": counts.get("refused", 0),
                   "store_truncated": counts.get("truncated", 0)})

    def ref(self, rm_version: str) -> ModelRef:
        row = (self.lake.scan(REGISTRY).filter(pl.col("rm_version") == rm_version).collect().row(0, named=True))
        return ref_of(row, self.tracking_uri, self.cache_root)

    def load(self, rm_version: str):
        if rm_version not in self._loaded:
            self._loaded[rm_version] = self.load_fn(self.ref(rm_version).local_path())
        return self._loaded[rm_version]

    def score(self, rm_version: str, pairs: pl.DataFrame) -> pl.DataFrame:
        from pipelines.rm.score import score_rows

        scored, _ = score_rows(self.load(rm_version), pairs.select(TRAIN_COLUMNS).to_dicts(), rm_version,
                               max_len=self.cfg.max_len, batch_size=self.score_batch_size)
        return scored
