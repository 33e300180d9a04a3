"""MLflow tracking for RM runs: params, per-step metrics, the HF model folder, a registered model version."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.tracking import MlflowClient


def configure(tracking_uri: str) -> None:
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def ensure_experiment(name: str, artifact_root: str | None) -> str:
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root)


@contextmanager
def run(tracking_uri: str, experiment: str, run_name: str, artifact_root: str | None = None,
        tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    configure(tracking_uri)
    exp_id = ensure_experiment(experiment, artifact_root)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags) as r:
        yield r


def log_model_folder(model_dir: str, registered_name: str | None) -> str | None:
    """Log the HF folder as the run's `model` artifact and register it; returns the registered version."""
    mlflow.log_artifacts(model_dir, artifact_path="model")
    if not registered_name:
        return None
    run_id = mlflow.active_run().info.run_id
    mv = mlflow.register_model(f"runs:/{run_id}/model", registered_name)
    return str(mv.version)


def download_model(tracking_uri: str, name: str, version: str | None = None, alias: str | None = None,
                   dst: str | None = None) -> str:
    configure(tracking_uri)
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version or 'latest'}"
    return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
