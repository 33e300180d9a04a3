"""The deployment's settings from its environment: each SYNPREF_* variable set when the code location loads becomes a
`dg.EnvVar` on its resource field, resolved in the run worker (the UI and the run config show the variable's name,
never its value, so the API key stays out of both). A variable that is not set leaves the field's default.

Kept in one table, so docs/deployment.md, deploy/synpref.env.example and the tests name the same variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import dagster as dg


@dataclass(frozen=True)
class Setting:
    env: str
    resource: str  # key in the Definitions' resources
    field: str
    kind: str = "str"  # str | int
    secret: bool = False
    help: str = ""


SETTINGS: list[Setting] = [
    Setting("SYNPREF_LLM_BACKEND", "llm", "backend", help="openai | vllm | transformers | simulated (demo only); "
                                                          "unset: LLM steps refuse"),
    Setting("SYNPREF_LLM_BASE_URL", "llm", "base_url", help="OpenAI-compatible server, e.g. http://vllm:8000/v1"),
    Setting("SYNPREF_LLM_MODELS", "llm", "models_csv", help="comma-separated judge ids; the first writes attributes"),
    Setting("SYNPREF_LLM_API_KEY", "llm", "api_key", secret=True, help="the endpoint's key (a secret)"),
    Setting("SYNPREF_LLM_CONCURRENCY", "llm", "concurrency", "int", help="requests in flight per model"),
    Setting("SYNPREF_LLM_RPM", "llm", "requests_per_minute", "int", help="client-side requests/minute per model"),
    Setting("SYNPREF_LLM_TPM", "llm", "tokens_per_minute", "int", help="client-side tokens/minute per model"),
    Setting("SYNPREF_LAKE_ROOT", "lake_store", "root", help="Delta lake root: folder or s3://bucket/prefix"),
    Setting("SYNPREF_LANDING_ROOT", "lake_store", "landing_root", help="where raw shards land"),
    Setting("SYNPREF_MLFLOW_URI", "mlflow_store", "tracking_uri", help="MLflow tracking URI"),
    Setting("SYNPREF_RAY_ADDRESS", "compute", "address", help="'auto' or ray://head:10001 (unset: a local Ray)"),
    Setting("SYNPREF_TRAINER_LAUNCHER", "trainer", "launcher", help="inprocess | torchrun | slurm | k8s"),
    Setting("SYNPREF_TRAINER_NPROC_PER_NODE", "trainer", "nproc_per_node", "int", help="GPUs per node"),
    Setting("SYNPREF_TRAINER_NNODES", "trainer", "nnodes", "int", help="nodes of a training job (slurm: srun --nodes)"),
    Setting("SYNPREF_TRAINER_SLURM_PARTITION", "trainer", "slurm_partition", help="slurm launcher: srun --partition"),
    Setting("SYNPREF_TRAINER_K8S_IMAGE", "trainer", "k8s_image", help="k8s launcher: the training image"),
    Setting("SYNPREF_TRAINER_K8S_NAMESPACE", "trainer", "k8s_namespace", help="k8s launcher: namespace"),
    Setting("SYNPREF_TRAINER_K8S_VOLUME_CLAIM", "trainer", "k8s_volume_claim", help="k8s launcher: PVC of SYNPREF_HOME"),
]


def env_config(resource: str, environ: Mapping[str, str] | None = None) -> dict[str, dg.EnvVar]:
    """The fields of `resource` that this environment sets, as EnvVars (resolved when a run initialises them)."""
    environ = os.environ if environ is None else environ
    out: dict[str, dg.EnvVar] = {}
    for s in SETTINGS:
        if s.resource == resource and environ.get(s.env, "") != "":
            out[s.field] = dg.EnvVar.int(s.env) if s.kind == "int" else dg.EnvVar(s.env)
    return out
