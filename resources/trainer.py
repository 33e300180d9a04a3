"""TrainerResource: device, precision, token store and launcher for RM training and scoring.

Launchers:
- `inprocess`: trains inside the Dagster step (the CPU default, one GPU).
- `torchrun`: `torchrun -m pipelines.rm.launch` under Dagster Pipes (`PipesSubprocessClient`) on this node: FSDP2
  across its GPUs (gloo on CPU); per-step metrics come back into the run's log, the result as a Pipes message.
  `nnodes` > 1 with `rdzv_endpoint` runs this node's share of a multi-node job (c10d rendezvous); every node runs
  the same command (see `k8s`).
- `k8s`: the same command in a pod launched by dagster-k8s' `PipesK8sClient` (image, namespace, GPUs per pod, the
  shared volume that holds the token store, the spec and the model folders); Pipes messages travel in the pod's
  log. One pod = one node; docs/deployment.md says how a multi-node job is laid out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import dagster as dg
import torch
from pydantic import Field

from pipelines.rm.launch import read_result, torchrun_command, train_with_torchrun, write_spec
from pipelines.rm.model import RewardModel, load_reward_model
from pipelines.rm.train import TrainConfig, TrainResult, train_reward_model


class TrainerResource(dg.ConfigurableResource):
    device: str = Field(default="auto", description="auto | cpu | cuda")
    launcher: str = Field(default="inprocess", description="inprocess | torchrun (this node, under Dagster Pipes) | "
                                                           "k8s (one pod through dagster-k8s' PipesK8sClient)")
    nproc_per_node: int = Field(default=1, description="Ranks (GPUs) per node for torchrun / k8s")
    nnodes: int = Field(default=1, description="Nodes of a multi-node torchrun job (1 = --standalone)")
    rdzv_endpoint: str = Field(default="", description="host:port of the c10d rendezvous when nnodes > 1")
    rdzv_id: str = Field(default="synpref-rm", description="Rendezvous id shared by a job's nodes")
    module: str = Field(default="pipelines.rm.launch", description="Module torchrun runs (a site may wrap it)")
    bf16: str = Field(default="auto", description="auto | true | false (auto = bf16 on GPUs that support it; under "
                                                  "FSDP: bf16 compute, fp32 gradient reduction and master weights)")
    attn_implementation: str = Field(default="", description="'' = transformers' default (sdpa); "
                                                             "flash_attention_2 on GPUs with flash-attn: decoders then "
                                                             "train padding-free (`packed` layout)")
    store_root: str = Field(default="", description="Token stores (tokenized training sets, reused by key); default "
                                                    "<SYNPREF_HOME>/token_store. Must be a filesystem every rank "
                                                    "can map (node disk, or the cluster's shared filesystem)")
    k8s_image: str = Field(default="", description="k8s launcher: the image (this project + CUDA torch)")
    k8s_namespace: str = Field(default="default", description="k8s launcher: namespace of the training pods")
    k8s_volume_claim: str = Field(default="", description="k8s launcher: PVC holding SYNPREF_HOME (token stores, "
                                                          "model folders), mounted at the same path in the pod")

    def torch_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def load(self, path: str) -> RewardModel:
        return load_reward_model(path, device=self.torch_device(), attn_implementation=self.attn_implementation or None)

    def torchrun_command(self, spec_path: str, python: str = sys.executable) -> list[str]:
        return torchrun_command(spec_path, nproc=self.nproc_per_node, nnodes=self.nnodes,
                                rdzv_endpoint=self.rdzv_endpoint, rdzv_id=self.rdzv_id, module=self.module,
                                python=python)

    def k8s_pod_spec(self) -> dict:
        """base_pod_spec for PipesK8sClient: the node's GPUs, the shared volume at SYNPREF_HOME's path (token stores,
        model folders, the spec), and a memory-backed /dev/shm for DataLoader workers (64 MB by default in a pod)."""
        from pipelines.settings import home

        mounts = [{"name": "dshm", "mount_path": "/dev/shm"}]
        volumes: list[dict] = [{"name": "dshm", "empty_dir": {"medium": "Memory"}}]
        if self.k8s_volume_claim:
            mounts.append({"name": "synpref-home", "mount_path": str(home())})
            volumes.append({"name": "synpref-home", "persistent_volume_claim": {"claim_name": self.k8s_volume_claim}})
        container = {"resources": {"limits": {"nvidia.com/gpu": str(self.nproc_per_node)}}, "volume_mounts": mounts}
        return {"containers": [container], "volumes": volumes, "restart_policy": "Never"}

    def k8s_env(self) -> dict[str, str]:
        """The pod's environment: the same SYNPREF_HOME path (on the PVC). The MLflow run travels in the spec."""
        from pipelines.settings import home

        return {"SYNPREF_HOME": str(home()), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def train(self, backbone: str, train, val_rows: list[dict], cfg: TrainConfig, out_dir: str,
              log: Callable[[dict, int], None] | None = None, *, context=None) -> TrainResult:
        """`train`: a TokenStore (or rows, in process only). Under torchrun/k8s with a Dagster `context`, the
        launch goes through Pipes; without one (the CLI, benchmarks) torchrun runs as a plain subprocess."""
        cfg.bf16 = self.bf16
        if self.launcher == "inprocess":
            return train_reward_model(self.load(backbone), train, val_rows, cfg, out_dir, log=log)
        if self.launcher not in ("torchrun", "k8s"):
            raise ValueError(f"unknown launcher {self.launcher!r}")
        if isinstance(train, list):
            raise ValueError("the torchrun launcher trains from a token store (pipelines.rm.store)")
        if self.launcher == "k8s":
            if context is None:
                raise ValueError("the k8s launcher runs from a Dagster step (PipesK8sClient needs its context)")
            if self.nnodes != 1:
                raise ValueError("the k8s launcher runs one pod (one node, nproc_per_node GPUs); a multi-node job "
                                 "needs one pod per node started together (docs/deployment.md)")
        spec = write_spec(backbone, train, val_rows, cfg, out_dir, self.attn_implementation or None)
        live = "mlflow" in json.loads(spec.read_text())
        cwd = str(Path(__file__).resolve().parents[1])
        if self.launcher == "k8s":
            from dagster_k8s import PipesK8sClient

            inv = PipesK8sClient().run(context=context, image=self.k8s_image, namespace=self.k8s_namespace,
                                       command=self.torchrun_command(str(spec), python="python"),
                                       env=self.k8s_env(), base_pod_spec=self.k8s_pod_spec())
        elif context is not None:
            inv = dg.PipesSubprocessClient(cwd=cwd).run(context=context, command=self.torchrun_command(str(spec)))
        else:
            return train_with_torchrun(backbone, train, val_rows, cfg, out_dir, nproc=self.nproc_per_node, log=log,
                                       attn_implementation=self.attn_implementation or None)
        res = read_result(spec, inv.get_custom_messages())
        if log and not live:
            for rec in res.history:
                log(rec, rec["step"])
        return res
