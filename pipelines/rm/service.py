"""One object for "train, register, fetch and score an RM", built by the assets from their resources and handed
to the curation loops (which only see the `RewardModels` protocol of `pipelines.curate.stage1`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import polars as pl

from pipelines.lake import Lake
from pipelines.rm.registry import REGISTRY, ModelRef, RegisteredRM, model_dir, ref_of, train_and_register
from pipelines.rm.train import TrainConfig, TrainResult

TRAIN_COLUMNS = ["pair_id", "history", "chosen", "rejected"]


@dataclass
class MlflowRewardModels:
    lake: Lake
    tracking_uri: str
    experiment: str
    artifact_root: str | None
    home: Path
    backbone: str
    cfg: TrainConfig
    train_fn: Callable[..., TrainResult]  # (backbone, train_rows, val_rows, cfg, out_dir, log) -> TrainResult
    load_fn: Callable[[str], object]  # local folder -> RewardModel on the configured device
    score_batch_size: int = 64
    _loaded: dict = field(default_factory=dict, repr=False)

    @property
    def cache_root(self) -> Path:
        return self.home / "model_cache"

    def train(self, *, name: str, role: str, train: pl.DataFrame, val: pl.DataFrame, run_key: str,
              extra: dict | None = None) -> RegisteredRM:
        cols = [c for c in (*TRAIN_COLUMNS, "margin", "rejected_more") if c in train.columns]
        if "margin" in cols and train["margin"].null_count() == train.height:
            cols.remove("margin")
        return train_and_register(
            self.lake, tracking_uri=self.tracking_uri, experiment=self.experiment, name=name, role=role,
            backbone=self.backbone, train_rows=train.select(cols).to_dicts(),
            val_rows=val.select(TRAIN_COLUMNS).to_dicts(), cfg=self.cfg,
            out_dir=model_dir(self.home, name.removeprefix("synpref-"), run_key), train_fn=self.train_fn,
            artifact_root=self.artifact_root, extra=extra)

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
