"""TrainerResource: device, precision and launcher for RM training and scoring.

`inprocess` trains inside the Dagster step (CPU default, one GPU); `torchrun` launches
`torchrun --nproc_per_node N -m pipelines.rm.launch` for data-parallel FSDP across the node's GPUs (gloo on CPU):
each rank trains on its own slice of every global batch.
"""

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import dagster as dg
import polars as pl
import torch
from pydantic import Field

from pipelines.rm.model import RewardModel, load_reward_model
from pipelines.rm.train import TrainConfig, TrainResult, train_reward_model


class TrainerResource(dg.ConfigurableResource):
    device: str = Field(default="auto", description="auto | cpu | cuda")
    launcher: str = Field(default="inprocess", description="inprocess | torchrun")
    nproc_per_node: int = Field(default=1, description="GPUs per node for the torchrun launcher")
    bf16: str = Field(default="auto", description="auto | true | false (auto = bf16 on GPUs that support it)")
    attn_implementation: str = Field(default="", description="'' = transformers' default (sdpa); "
                                                             "flash_attention_2 on GPUs with flash-attn: decoders then "
                                                             "train padding-free (`packed` layout)")

    def torch_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def load(self, path: str) -> RewardModel:
        return load_reward_model(path, device=self.torch_device(), attn_implementation=self.attn_implementation or None)

    def train(self, backbone: str, train_rows: list[dict], val_rows: list[dict], cfg: TrainConfig, out_dir: str,
              log: Callable[[dict, int], None] | None = None) -> TrainResult:
        cfg.bf16 = self.bf16
        if self.launcher == "inprocess":
            return train_reward_model(self.load(backbone), train_rows, val_rows, cfg, out_dir, log=log)
        if self.launcher != "torchrun":
            raise ValueError(f"unknown launcher {self.launcher!r}")
        with tempfile.TemporaryDirectory() as d:
            cols = ["pair_id", "history", "chosen", "rejected"]
            extra = [c for c in ("margin", "rejected_more") if train_rows and c in train_rows[0]]
            pl.DataFrame(train_rows).select(cols + extra).write_parquet(f"{d}/train.parquet")
            (pl.DataFrame(val_rows).select(cols) if val_rows else pl.DataFrame(schema={c: pl.String for c in cols})
             ).write_parquet(f"{d}/val.parquet")
            spec = {"backbone": backbone, "train": f"{d}/train.parquet", "val": f"{d}/val.parquet",
                    "config": asdict(cfg), "out_dir": out_dir, "result": f"{d}/result.json",
                    "attn_implementation": self.attn_implementation or None}
            Path(f"{d}/spec.json").write_text(json.dumps(spec))
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={self.nproc_per_node}",
                            "-m", "pipelines.rm.launch", f"{d}/spec.json"], check=True)
            res = json.loads(Path(f"{d}/result.json").read_text())
        if log:
            for rec in res["history"]:
                log(rec, rec["step"])
        return TrainResult(**res)
