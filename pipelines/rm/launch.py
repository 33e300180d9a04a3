"""Training entry point for `torchrun` (multi-GPU FSDP): the trainer resource's `torchrun` launcher runs

    torchrun --nproc_per_node N -m pipelines.rm.launch spec.json

spec.json: backbone, train/val parquet paths, TrainConfig fields, out_dir, result path. Every rank reads the same
rows and trains on its own slice of each global batch (see pipelines.rm.train); rank 0 writes the result.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import polars as pl
import torch

from pipelines.rm.model import load_reward_model
from pipelines.rm.train import TrainConfig, is_main_process, train_reward_model


def main(spec_path: str, log=None) -> None:
    spec = json.loads(open(spec_path).read())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        import os

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rm = load_reward_model(spec["backbone"], device=device, attn_implementation=spec.get("attn_implementation"))
    res = train_reward_model(rm, pl.read_parquet(spec["train"]).to_dicts(), pl.read_parquet(spec["val"]).to_dicts(),
                             TrainConfig(**spec["config"]), spec["out_dir"], log=log)
    if is_main_process():
        with open(spec["result"], "w") as fh:
            json.dump(asdict(res), fh)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
