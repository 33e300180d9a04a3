"""MlflowResource: where runs and registered models go (default: SQLite + artifacts under SYNPREF_HOME)."""

import dagster as dg
from pydantic import Field

from pipelines.settings import default_mlflow_uri, home


class MlflowResource(dg.ConfigurableResource):
    tracking_uri: str = Field(default="", description="MLflow tracking URI; default sqlite:///<SYNPREF_HOME>/mlflow/mlflow.db")
    experiment: str = Field(default="synpref", description="MLflow experiment for every SynPref run")
    artifact_root: str = Field(default="", description="Artifact location for a new experiment; default <SYNPREF_HOME>/mlflow/artifacts")

    @property
    def uri(self) -> str:
        return self.tracking_uri or default_mlflow_uri()

    @property
    def artifacts(self) -> str:
        return self.artifact_root or (home() / "mlflow" / "artifacts").as_uri()
