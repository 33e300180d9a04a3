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
    run = mlflow.active_run()
    client = MlflowClient()
    try:
        client.get_registered_model(registered_name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(registered_name, description="SynPref Bradley-Terry reward model "
                                       "(HF AutoModelForSequenceClassification folder, num_labels=1)")
    # the artifact folder is a plain HF model directory; register it as the version's source
    mv = client.create_model_version(registered_name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return str(mv.version)


def download_model(tracking_uri: str, name: str, version: str | None = None, alias: str | None = None,
                   dst: str | None = None) -> str:
    configure(tracking_uri)
    client = MlflowClient()
    if alias:
        mv = client.get_model_version_by_alias(name, alias)
    elif version:
        mv = client.get_model_version(name, version)
    else:
        mv = max(client.search_model_versions(f"name='{name}'"), key=lambda m: int(m.version))
    return mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=dst)
