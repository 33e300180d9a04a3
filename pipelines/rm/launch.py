"""Training entry point for `torchrun` (one node or many): the trainer resource runs

    torchrun [--standalone | --nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT] --nproc-per-node G \\
        -m pipelines.rm.launch spec.json

under Dagster Pipes (`PipesSubprocessClient` on one node, `PipesK8sClient` in a pod, `srun` starting
pipelines.rm.slurm on every node of a Slurm job). spec.json: backbone, the
token store folder (every rank maps it and reads only its own micro-batches), gold_val parquet (small, in memory),
TrainConfig fields, out_dir (keyed by data + config: a rerun resumes), and optionally an MLflow run to log to.

Global rank 0 (torchrun's RANK; on whichever node the rendezvous put it) opens the Pipes channel when the
orchestrator provided one: each step goes back as a log line and a custom
message, the final TrainResult as a custom message; the other ranks only train. Rank 0 also logs each step to the
MLflow run given in the spec, live.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import polars as pl
import torch

from pipelines.rm.memory import MemoryPlanError
from pipelines.rm.model import load_reward_model
from pipelines.rm.shards import TokenStore
from pipelines.rm.train import TrainConfig, TrainResult, is_main_process, train_reward_model, use_bf16


def checkpoint_folder(backbone: str) -> Path | None:
    """The local folder of a backbone's safetensors: the folder itself, or a hub id's snapshot in the local cache
    (offline); None where there is none (then the plain HF load decides)."""
    folder = Path(backbone)
    if not (folder / "config.json").exists():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(backbone, local_files_only=True))
        except Exception:  # not a cached hub id: let transformers say what is wrong
            return None
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        return folder
    return None


def load_for_training(backbone: str, device: str, attn_implementation: str | None, bf16: str, seed: int):
    """Under torchrun, a model built on the meta device and loaded shard by shard in fp32 (no full copy per rank),
    local folders and cached hub ids alike; in one process, the plain HF load, in fp32 whatever the checkpoint
    stores (the optimizer's master weights)."""
    if "WORLD_SIZE" in os.environ and not os.environ.get("SYNPREF_NO_FSDP"):
        folder = checkpoint_folder(backbone)
        if folder is not None:
            from pipelines.rm.fsdp import load_sharded_reward_model

            rm = load_sharded_reward_model(str(folder), device=device, attn_implementation=attn_implementation,
                                           bf16=use_bf16(bf16, torch.device(device)), seed=seed)
            rm.name_or_path = backbone
            return rm
    return load_reward_model(backbone, device=device, attn_implementation=attn_implementation, seed=seed,
                             dtype=torch.float32)


def _pipes():
    """The Dagster Pipes context on global rank 0 when launched under Pipes, else None. torchrun sets RANK to the
    global rank (LOCAL_RANK is the node's), so one process of a multi-node job talks to Dagster."""
    if not os.environ.get("DAGSTER_PIPES_CONTEXT") or int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext(None)
    from dagster_pipes import open_dagster_pipes

    return open_dagster_pipes()


def _mlflow_logger(spec: dict):
    cfg = spec.get("mlflow")
    if not cfg or not is_main_process():
        return None
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg["tracking_uri"])

    def log(rec: dict, step: int) -> None:
        ts = int(time.time() * 1000)
        client.log_batch(cfg["run_id"], metrics=[Metric(k, float(v), ts, step) for k, v in rec.items()
                                                 if k != "step" and isinstance(v, (int, float))])

    return log


# --- the launching side (orchestrator, CLI) --------------------------------------------------------------------------
TRAIN_COLUMNS = ["pair_id", "history", "chosen", "rejected"]
ROOT = Path(__file__).resolve().parents[2]


def torchrun_args(spec_path: str, *, nproc: int, nnodes: int = 1, rdzv_endpoint: str = "",
                  rdzv_id: str = "synpref-rm", module: str = "pipelines.rm.launch", node_rank: int | None = None,
                  rdzv_is_host: bool | None = None) -> list[str]:
    """torchrun's arguments (what follows `torchrun`); `--standalone` only for one node, a c10d rendezvous across
    several. `node_rank` / `rdzv_is_host` come from a scheduler that knows them (pipelines.rm.slurm): the node
    whose host is the endpoint then hosts the rendezvous store, instead of torch guessing it from hostnames."""
    cmd = [f"--nproc-per-node={nproc}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        if not rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (host:port every node reaches)")
        cmd.append(f"--nnodes={nnodes}")
        if node_rank is not None:
            cmd.append(f"--node-rank={node_rank}")
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
        if rdzv_is_host is not None:
            cmd.append(f"--rdzv-conf=is_host={int(rdzv_is_host)}")
    return cmd + ["-m", module, spec_path]


def torchrun_command(spec_path: str, *, nproc: int, nnodes: int = 1, rdzv_endpoint: str = "",
                     rdzv_id: str = "synpref-rm", module: str = "pipelines.rm.launch",
                     python: str = sys.executable) -> list[str]:
    """The launch command: torchrun's own entry (`python -m torch.distributed.run`) with `torchrun_args`."""
    return [python, "-m", "torch.distributed.run"] + torchrun_args(
        spec_path, nproc=nproc, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id, module=module)


def write_spec(backbone: str, store, val_rows: list[dict], cfg: TrainConfig, out_dir: str,
               attn_implementation: str | None = None) -> Path:
    """spec.json (+ gold_val parquet) beside the model folder, where every node of the job can read it. Inside an
    active MLflow run, rank 0 is told to log each step to it."""
    launch = Path(out_dir) / "launch"
    launch.mkdir(parents=True, exist_ok=True)
    (pl.DataFrame(val_rows).select(TRAIN_COLUMNS) if val_rows
     else pl.DataFrame(schema={c: pl.String for c in TRAIN_COLUMNS})).write_parquet(launch / "val.parquet")
    spec = {"backbone": backbone, "store": str(store.path), "val": str(launch / "val.parquet"), "config": asdict(cfg),
            "out_dir": out_dir, "result": str(launch / "result.json"),
            "attn_implementation": attn_implementation or cfg.attn_implementation}
    import mlflow

    run = mlflow.active_run()
    if run is not None:
        spec["mlflow"] = {"tracking_uri": mlflow.get_tracking_uri(), "run_id": run.info.run_id}
    (launch / "result.json").unlink(missing_ok=True)
    (launch / "spec.json").write_text(json.dumps(spec))
    return launch / "spec.json"


def read_result(spec_path: Path, messages: list | None = None) -> TrainResult:
    """The run's TrainResult: result.json beside the spec (full history), else the Pipes result message."""
    result = Path(spec_path).parent / "result.json"
    if result.exists():
        return TrainResult(**json.loads(result.read_text()))
    for m in messages or []:
        if isinstance(m, dict) and m.get("kind") == "result":
            return TrainResult(**m["result"])
    raise RuntimeError("the training job ended without a result (no result.json, no Pipes message)")


def train_with_torchrun(backbone: str, store, val_rows: list[dict], cfg: TrainConfig, out_dir: str, *, nproc: int,
                        log=None, attn_implementation: str | None = None) -> TrainResult:
    """torchrun as a plain subprocess on this node (the CLI and benchmarks; assets go through Dagster Pipes)."""
    import subprocess

    spec = write_spec(backbone, store, val_rows, cfg, out_dir, attn_implementation)
    refused = spec.parent / "refused.txt"
    refused.unlink(missing_ok=True)
    done = subprocess.run(torchrun_command(str(spec), nproc=nproc), cwd=str(ROOT))
    if done.returncode and refused.exists():  # the ranks' preflight said why, before training
        raise MemoryPlanError(refused.read_text())
    done.check_returncode()
    res = read_result(spec)
    if log and "mlflow" not in json.loads(spec.read_text()):
        for rec in res.history:
            log(rec, rec["step"])
    return res


def main(spec_path: str, log=None) -> None:
    spec = json.loads(Path(spec_path).read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    cfg = TrainConfig(**spec["config"])
    with _pipes() as pipes:
        rm = load_for_training(spec["backbone"], device, spec.get("attn_implementation"), cfg.bf16, cfg.seed)
        to_mlflow = _mlflow_logger(spec)

        def on_step(rec: dict, step: int) -> None:
            if to_mlflow:
                to_mlflow(rec, step)
            if pipes is not None:
                pipes.log.info("step " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in rec.items() if k != "step") + f" ({step})")
                pipes.report_custom_message({"kind": "step", **rec})
            if log:
                log(rec, step)

        val = pl.read_parquet(spec["val"]).to_dicts() if spec.get("val") else []
        try:
            res = train_reward_model(rm, TokenStore(spec["store"]), val, cfg, spec["out_dir"], log=on_step)
        except MemoryPlanError as e:  # for the launcher to say, rather than a rank's traceback
            # every rank writes it (torchrun stops the others when the first fails); the same text on every rank
            tmp = Path(spec_path).parent / f"refused.{os.environ.get('RANK', '0')}.tmp"
            tmp.write_text(str(e))
            tmp.replace(Path(spec_path).parent / "refused.txt")
            raise
        if is_main_process():
            if spec.get("result"):
                Path(spec["result"]).write_text(json.dumps(asdict(res)))
            if pipes is not None:
                pipes.report_custom_message({"kind": "result", "result": {**asdict(res), "history": []}})
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
