"""Train, log to MLflow, register, and record in the `rm_registry` table: one call used by every RM asset.

Tables refer to models by `rm_version` = "<registered name>:<version>"; the registry row holds the local
folder and the MLflow run, so later stages load by version and anyone can trace a score to its model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import mlflow
import polars as pl

from pipelines.lake import Lake
from pipelines.rm import tracking
from pipelines.rm.train import TrainConfig, TrainResult

REGISTRY = "rm_registry"
REGISTRY_SCHEMA = {"rm_version": pl.String, "name": pl.String, "role": pl.String, "backbone": pl.String,
                   "path": pl.String, "mlflow_run_id": pl.String, "registered_version": pl.String,
                   "val_accuracy": pl.Float64, "train_pairs": pl.Int64, "extra": pl.String,
                   "created_at": pl.Datetime("us", "UTC")}


@dataclass
class RegisteredRM:
    rm_version: str
    path: str
    mlflow_run_id: str
    val_accuracy: float
    result: TrainResult


def train_and_register(lake: Lake, *, tracking_uri: str, experiment: str, name: str, role: str, backbone: str,
                       train_rows: list[dict], val_rows: list[dict], cfg: TrainConfig, out_dir: str,
                       train_fn: Callable[..., TrainResult], extra: dict | None = None,
                       artifact_root: str | None = None) -> RegisteredRM:
    """train_fn(backbone, train_rows, val_rows, cfg, out_dir, log) -> TrainResult (in-process or torchrun)."""
    with tracking.run(tracking_uri, experiment, name, artifact_root, tags={"role": role}) as run:
        mlflow.log_params({**{f"train.{k}": v for k, v in asdict(cfg).items()}, "backbone": backbone,
                           "train_pairs": len(train_rows), "val_pairs": len(val_rows), **(extra or {})})
        res = train_fn(backbone, train_rows, val_rows, cfg, out_dir,
                       lambda rec, step: mlflow.log_metrics({k: float(v) for k, v in rec.items() if k != "step"}, step=step))
        mlflow.log_metrics({"best_val_accuracy": res.best_val_accuracy, "tokens_per_s": res.tokens_per_s,
                            **{f"length_{k}": v for k, v in res.length.items()}})
        version = tracking.log_model_folder(res.best_dir, name)
        run_id = run.info.run_id
    rm_version = f"{name}:{version}"
    lake.append(REGISTRY, pl.DataFrame([{
        "rm_version": rm_version, "name": name, "role": role, "backbone": backbone, "path": res.best_dir,
        "mlflow_run_id": run_id, "registered_version": version, "val_accuracy": res.best_val_accuracy,
        "train_pairs": len(train_rows), "extra": json.dumps(extra or {}), "created_at": datetime.now(timezone.utc),
    }], schema=REGISTRY_SCHEMA).to_arrow())
    return RegisteredRM(rm_version, res.best_dir, run_id, res.best_val_accuracy, res)


def latest(lake: Lake, *, name: str | None = None, role: str | None = None) -> dict | None:
    if not lake.exists(REGISTRY):
        return None
    df = lake.read(REGISTRY)
    if name:
        df = df.filter(pl.col("name") == name)
    if role:
        df = df.filter(pl.col("role") == role)
    return df.sort("created_at").row(-1, named=True) if df.height else None


def best_of(lake: Lake, role: str) -> dict | None:
    """The registered model of `role` with the best validation (gold) accuracy; latest on ties."""
    if not lake.exists(REGISTRY):
        return None
    df = lake.read(REGISTRY).filter(pl.col("role") == role)
    return df.sort(["val_accuracy", "created_at"]).row(-1, named=True) if df.height else None


def model_dir(home: Path, name: str, run_key: str) -> str:
    p = home / "models" / name / run_key
    p.mkdir(parents=True, exist_ok=True)
    return str(p)
