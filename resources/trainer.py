"""TrainerResource: device, precision, token store and launcher for RM training and scoring.

Launchers:
- `inprocess`: trains inside the Dagster step (the CPU default, one GPU).
- `torchrun`: `torchrun -m pipelines.rm.launch` under Dagster Pipes (`PipesSubprocessClient`) on this node: FSDP2
  across its GPUs (gloo on CPU); per-step metrics come back into the run's log, the result as a Pipes message.
  `nnodes` > 1 with `rdzv_endpoint` runs only this node's share of a multi-node job (c10d rendezvous): another
  scheduler must start the same command on the other nodes (the `slurm` launcher does it all).
- `slurm`: a multi-node job started on every node by Slurm: the step runs `srun --nodes=nnodes --ntasks-per-node=1
  ... python -m pipelines.rm.slurm spec.json` under `PipesSubprocessClient` (on a login/submit node, inside an
  allocation or not); each node runs torchrun for its share (pipelines.rm.slurm). Global rank 0 may land on any
  node, so Pipes context and messages go through files in the spec's folder, which is on the shared filesystem like
  the token store and the model folder; per-step messages are read as rank 0 writes them.
- `k8s`: the same command in a pod launched by dagster-k8s' `PipesK8sClient` (image, namespace, GPUs per pod, the
  shared volume that holds the token store, the spec and the model folders); Pipes messages travel in the pod's
  log. One pod = one node: this launcher stays single-pod (docs/deployment.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import dagster as dg
import torch
from pydantic import Field

from pipelines.rm.launch import ROOT, read_result, torchrun_command, train_with_torchrun, write_spec
from pipelines.rm.memory import MemoryPlanError
from pipelines.rm.model import RewardModel, load_reward_model
from pipelines.rm.slurm import DEFAULT_RDZV_PORT, entry_command
from pipelines.rm.train import TrainConfig, TrainResult, train_reward_model


class TrainerResource(dg.ConfigurableResource):
    device: str = Field(default="auto", description="auto | cpu | cuda")
    launcher: str = Field(default="inprocess", description="inprocess | torchrun (this node, under Dagster Pipes) | "
                                                           "slurm (every node, started by srun) | "
                                                           "k8s (one pod through dagster-k8s' PipesK8sClient)")
    nproc_per_node: int = Field(default=1, description="Ranks (GPUs) per node for torchrun / slurm / k8s")
    nnodes: int = Field(default=1, description="Nodes of a multi-node job: torchrun (1 = --standalone; more = this "
                                               "node's share) or slurm (srun --nodes)")
    rdzv_endpoint: str = Field(default="", description="torchrun launcher: host:port of the c10d rendezvous when "
                                                       "nnodes > 1 (slurm: the step's first node)")
    rdzv_port: int = Field(default=DEFAULT_RDZV_PORT, description="slurm launcher: port of the c10d rendezvous on "
                                                                  "the step's first node")
    slurm_partition: str = Field(default="", description="slurm launcher: srun --partition ('' = the default)")
    slurm_gpus_per_node: int = Field(default=-1, description="slurm launcher: srun --gpus-per-node (-1 = "
                                                             "nproc_per_node; 0 = none asked: CPU nodes, or GPUs "
                                                             "set by the partition)")
    slurm_extra_args: list[str] = Field(default=[], description="slurm launcher: more srun options (--account=..., "
                                                                "--time=..., --container-image=...)")
    slurm_python: str = Field(default="", description="slurm launcher: the interpreter on the nodes ('' = this "
                                                      "step's: the same venv path on the shared filesystem)")
    rdzv_id: str = Field(default="synpref-rm", description="torchrun launcher: rendezvous id shared by a job's nodes "
                                                          "(slurm: synpref-<job id>)")
    module: str = Field(default="pipelines.rm.launch", description="Module torchrun runs (a site may wrap it)")
    bf16: str = Field(default="auto", description="auto | true | false (auto = bf16 on GPUs that support it; under "
                                                  "FSDP: bf16 compute, fp32 gradient reduction and master weights)")
    attn_implementation: str = Field(default="", description="'' = the training config's (auto: "
                                                             "flash_attention_2 where flash-attn is installed, else "
                                                             "flex_attention on GPUs, sdpa on CPU); set, it wins for "
                                                             "every model this resource loads")
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

    def load(self, path: str, dtype: torch.dtype | None = None) -> RewardModel:
        return load_reward_model(path, device=self.torch_device(), attn_implementation=self.attn_implementation or None,
                                 dtype=dtype)

    def torchrun_command(self, spec_path: str, python: str = sys.executable) -> list[str]:
        return torchrun_command(spec_path, nproc=self.nproc_per_node, nnodes=self.nnodes,
                                rdzv_endpoint=self.rdzv_endpoint, rdzv_id=self.rdzv_id, module=self.module,
                                python=python)

    def srun_command(self, spec_path: str) -> list[str]:
        """srun starts pipelines.rm.slurm once per node. --export=ALL: the DAGSTER_PIPES_* variables must reach
        the nodes even where the site sets SLURM_EXPORT_ENV=NONE; --kill-on-bad-exit: a node that fails ends the
        job instead of leaving the others waiting in a collective; --quit-on-interrupt: Dagster's termination
        (one SIGINT) ends the step (a single SIGINT otherwise only makes srun print its status)."""
        gpus = self.nproc_per_node if self.slurm_gpus_per_node < 0 else self.slurm_gpus_per_node
        cmd = ["srun", f"--nodes={self.nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--export=ALL",
               "--quit-on-interrupt"]
        if self.slurm_partition:
            cmd.append(f"--partition={self.slurm_partition}")
        if gpus:
            cmd.append(f"--gpus-per-node={gpus}")
        return cmd + list(self.slurm_extra_args) + entry_command(
            spec_path, nproc=self.nproc_per_node, port=self.rdzv_port, module=self.module,
            python=self.slurm_python or sys.executable)

    def slurm_pipes_client(self, spec_path: str | Path) -> dg.PipesSubprocessClient:
        """Pipes through files beside the spec (a folder on the shared filesystem): global rank 0 may run on any
        node of the job, not the step's; the reader tails the messages file while the job runs. The messages file
        stays for a post-mortem (the next launch starts it afresh); the context file goes with the session."""
        launch = Path(spec_path).parent
        return dg.PipesSubprocessClient(
            cwd=str(ROOT), context_injector=dg.PipesFileContextInjector(str(launch / "pipes_context.json")),
            message_reader=dg.PipesFileMessageReader(str(launch / "pipes_messages.jsonl"), cleanup_file=False))

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
            # fp32 master weights whatever the checkpoint stores; bf16 compute by autocast (pipelines.rm.train)
            rm = load_reward_model(backbone, device=self.torch_device(), dtype=torch.float32,
                                   attn_implementation=self.attn_implementation or cfg.attn_implementation)
            return train_reward_model(rm, train, val_rows, cfg, out_dir, log=log)
        if self.launcher not in ("torchrun", "k8s", "slurm"):
            raise ValueError(f"unknown launcher {self.launcher!r}")
        if isinstance(train, list):
            raise ValueError(f"the {self.launcher} launcher trains from a token store (pipelines.rm.store)")
        if self.launcher == "slurm" and context is None:
            raise ValueError("the slurm launcher runs from a Dagster step (Pipes brings the steps and the result)")
        if self.launcher == "k8s":
            if context is None:
                raise ValueError("the k8s launcher runs from a Dagster step (PipesK8sClient needs its context)")
            if self.nnodes != 1:
                raise ValueError("the k8s launcher runs one pod (one node, nproc_per_node GPUs); a multi-node job "
                                 "needs one pod per node started together (docs/deployment.md)")
        spec = write_spec(backbone, train, val_rows, cfg, out_dir, self.attn_implementation or None)
        live = "mlflow" in json.loads(spec.read_text())
        cwd = str(ROOT)
        if self.launcher == "slurm":
            refused = spec.parent / "refused.txt"
            refused.unlink(missing_ok=True)
            try:
                inv = self.slurm_pipes_client(spec).run(context=context, command=self.srun_command(str(spec)))
            except Exception as e:  # the job failed (Dagster's DagsterPipesExecutionError is not public)
                if refused.exists():  # the ranks' preflight said why, before training (on whichever node)
                    raise MemoryPlanError(refused.read_text()) from e
                raise
        elif self.launcher == "k8s":
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
