"""Train, log to MLflow, register, and record in the `rm_registry` table: one call used by every RM asset.

Tables refer to models by `rm_version` = "<registered name>:<version>". The registry row holds the MLflow model URI
(`models:/<name>/<version>`), which any worker with access to the tracking server and its artifact store can fetch
(`fetch_model`: once per node, into a local cache), plus the folder the model was trained into (provenance only:
it is a path on the training machine). `rm_data_manifest` records which pair ids each RM trained on and was
selected on, so a report can prove it never scores a pair a model has seen.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import mlflow
import polars as pl
import pyarrow as pa

from pipelines.tables import RM_DATA

from pipelines.lake import Lake
from pipelines.rm import tracking
from pipelines.rm.calibration import Calibration
from pipelines.rm.train import TrainConfig, TrainResult

from pipelines.tables import RM_REGISTRY as REGISTRY
REGISTRY_SCHEMA = {"rm_version": pl.String, "name": pl.String, "role": pl.String, "backbone": pl.String,
                   "model_uri": pl.String, "path": pl.String, "mlflow_run_id": pl.String, "registered_version": pl.String,
                   "val_accuracy": pl.Float64, "train_pairs": pl.Int64, "extra": pl.String,
                   "created_at": pl.Datetime("us", "UTC")}


DATA_SCHEMA = {"rm_version": pl.String, "pair_id": pl.String, "use": pl.String}  # use: train | select


@dataclass
class RegisteredRM:
    rm_version: str
    model_uri: str
    path: str
    mlflow_run_id: str
    val_accuracy: float
    result: TrainResult


def _train_ids(train) -> Iterator[pa.RecordBatch]:
    if isinstance(train, list):
        yield pa.record_batch([pa.array([r["pair_id"] for r in train], pa.string())], names=["pair_id"])
    else:
        yield from train.pair_ids()


def train_and_register(lake: Lake, *, tracking_uri: str, experiment: str, name: str, role: str, backbone: str,
                       train, val_rows: list[dict], cfg: TrainConfig, out_dir: str,
                       train_fn: Callable[..., TrainResult], extra: dict | None = None,
                       artifact_root: str | None = None) -> RegisteredRM:
    """train_fn(backbone, train, val_rows, cfg, out_dir, log) -> TrainResult (in-process or torchrun), called
    inside the MLflow run (a torchrun launcher finds it with `mlflow.active_run()` and logs from rank 0). `train`:
    a TokenStore (the product path), or rows for small sets. The data manifest (which pairs this RM trained and was
    selected on) streams from the store shard by shard."""
    n_train = len(train)
    with tracking.run(tracking_uri, experiment, name, artifact_root, tags={"role": role}) as run:
        mlflow.log_params({**{f"train.{k}": v for k, v in asdict(cfg).items()}, "backbone": backbone,
                           "train_pairs": n_train, "val_pairs": len(val_rows), **(extra or {})})
        res = train_fn(backbone, train, val_rows, cfg, out_dir,
                       lambda rec, step: mlflow.log_metrics({k: float(v) for k, v in rec.items() if k != "step"}, step=step))
        cal = Calibration.of_folder(res.best_dir)  # written by the trainer with the checkpoint it kept
        if cal.n:
            mlflow.log_params({"calibration.mean": cal.mean, "calibration.std": cal.std, "calibration.n": cal.n,
                               "calibration.source": cal.source})
        mlflow.log_metrics({"best_val_accuracy": res.best_val_accuracy, "tokens_per_s": res.tokens_per_s,
                            "resumed_from_step": res.resumed_from_step,
                            **{f"length_{k}": v for k, v in res.length.items()}})
        version = tracking.log_model_folder(res.best_dir, name)
        run_id = run.info.run_id
    rm_version = f"{name}:{version}"
    uri = f"models:/{name}/{version}"
    lake.append_batches(RM_DATA, _manifest(train, val_rows, rm_version), MANIFEST_SCHEMA)
    lake.append(REGISTRY, pl.DataFrame([{
        "rm_version": rm_version, "name": name, "role": role, "backbone": backbone, "model_uri": uri,
        "path": res.best_dir,
        "mlflow_run_id": run_id, "registered_version": version, "val_accuracy": res.best_val_accuracy,
        "train_pairs": n_train, "extra": json.dumps(extra or {}), "created_at": datetime.now(timezone.utc),
    }], schema=REGISTRY_SCHEMA).to_arrow())
    return RegisteredRM(rm_version, uri, res.best_dir, run_id, res.best_val_accuracy, res)


MANIFEST_SCHEMA = pa.schema([("rm_version", pa.string()), ("pair_id", pa.string()), ("use", pa.string())])


def _manifest(train, val_rows: list[dict], rm_version: str) -> Iterator[pa.RecordBatch]:
    """(rm_version, pair_id, use) of every training pair (streamed from the store) and every selection pair."""
    def batch(ids: pa.Array, use: str) -> pa.RecordBatch:
        n = len(ids)
        return pa.record_batch([pa.array([rm_version] * n, pa.string()), ids, pa.array([use] * n, pa.string())],
                               schema=MANIFEST_SCHEMA)

    for b in _train_ids(train):
        yield batch(b.column("pair_id"), "train")
    yield batch(pa.array([r["pair_id"] for r in val_rows], pa.string()), "select")


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


def fetch_model(uri: str, tracking_uri: str, cache_root: str | Path) -> str:
    """A local folder holding the model at `uri`: a local folder is returned as is; `models:/<name>/<version>` is
    downloaded from MLflow once into `<cache_root>/<name>/<version>` (written beside, then renamed, so two workers
    on one node never see half a model) and reused after that."""
    if not uri.startswith("models:/"):
        return uri
    name, version = uri[len("models:/"):].split("/")
    dst = Path(cache_root) / name / version
    if (dst / "config.json").exists():
        return str(dst)
    import tempfile

    from pipelines.rm.tracking import download_model

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=dst.parent, prefix=f".{version}-")
    folder = download_model(tracking_uri, name, version=version, dst=tmp)
    try:
        Path(folder).rename(dst)
    except OSError:  # another worker finished first: use its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(dst)


@dataclass(frozen=True)
class ModelRef:
    """What a worker needs to load a registered RM anywhere: picklable, no local path baked in."""

    rm_version: str
    uri: str
    tracking_uri: str
    cache_root: str

    def local_path(self) -> str:
        return fetch_model(self.uri, self.tracking_uri, self.cache_root)


def ref_of(row: dict, tracking_uri: str, cache_root: str | Path) -> ModelRef:
    """The ModelRef of a registry row."""
    return ModelRef(row["rm_version"], row.get("model_uri") or row["path"], tracking_uri, str(cache_root))


def data_manifest(lake: Lake) -> pl.LazyFrame:
    """rm_version, pair_id, use (train | select) of every registered RM."""
    if not lake.exists(RM_DATA):
        return pl.LazyFrame(schema=DATA_SCHEMA)
    return lake.scan(RM_DATA)
