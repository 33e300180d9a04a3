"""Train a reward model on pairs you bring (`synpref train-rm`): the same token store, sampler, trainer and MLflow
logging as the RM assets, without the curation pipeline.

Inputs: a Parquet file or folder, or a Delta table, local or s3://, in any layout `pipelines.rm.store` reads
(history/chosen/rejected, or TRL's chosen/rejected conversations with or without `prompt`); extra columns are
ignored, a `margin` column feeds `margin_bt`, `rejected_more` (a list of strings) feeds K-negative/listwise losses.

Defaults are the paper's final runs (Skywork-Reward-V2, App. E): lr 3e-6, constant schedule, global batch 10,240,
one epoch, max length 16,384 (the paper states no warmup: 0 here). A global batch larger than the data is cut
to the data, and said so.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import polars as pl
import torch

from pipelines.rm.store import PairSource, SourceTable, build_token_store, detect_layout
from pipelines.rm.train import TrainConfig, TrainResult

PAPER_DEFAULTS = {"lr": 3e-6, "schedule": "constant", "batch_size": 10_240, "epochs": 1.0, "max_len": 16_384,
                  "warmup_ratio": 0.0}


def storage_options(uri: str) -> dict:
    if uri.startswith("s3://"):
        from pipelines.lake import s3_storage_options_from_env

        return s3_storage_options_from_env()
    return {}


def source_of(uri: str) -> SourceTable:
    """A SourceTable for a path: a Delta table (pinned at its current version) when it has a _delta_log, else
    Parquet; its layout recognised from the columns it needs."""
    from deltalake import DeltaTable

    opts = storage_options(uri)
    if uri.endswith(".parquet"):
        is_delta = False
    else:
        try:
            is_delta = DeltaTable.is_deltatable(uri, storage_options=opts or None)
        except OSError:
            is_delta = False
    if is_delta:
        version = DeltaTable(uri, storage_options=opts or None).version()
        t = SourceTable(uri, version, opts)
    else:
        t = SourceTable(uri, None, opts)
    schema = pl.from_arrow(t.dataset().schema.empty_table()).schema
    return SourceTable(t.uri, t.version, t.storage_options, layout=detect_layout(dict(schema)))


def parse_settings(pairs: list[str]) -> dict:
    """`key=value` overrides of TrainConfig fields, typed as the fields are."""
    types = {f.name: f.type for f in fields(TrainConfig)}
    out = {}
    for kv in pairs:
        if "=" not in kv:
            raise ValueError(f"--set takes key=value, not {kv!r}")
        k, v = kv.split("=", 1)
        if k not in types:
            raise ValueError(f"unknown setting {k!r}; one of {sorted(types)}")
        t = str(types[k])
        if "bool" in t:
            out[k] = v.lower() in ("1", "true", "yes")
        elif "int" in t and "float" not in t:
            out[k] = None if v.lower() == "none" else int(v)
        elif "float" in t:
            out[k] = float(v)
        else:
            out[k] = v
    return out


@dataclass
class ByoResult:
    result: TrainResult
    store_key: str
    store_reused: bool
    counts: dict
    mlflow_run_id: str
    registered: str | None
    notes: list[str]


def train_on_pairs(pairs: str, backbone: str, out: str, *, val: str | None = None, nproc: int = 1,
                   max_steps: int | None = None, settings: dict | None = None, store_root: str | None = None,
                   tracking_uri: str, experiment: str = "synpref", run_name: str = "train-rm",
                   register: str | None = None, build: str = "auto",
                   say: Callable[[str], None] = print) -> ByoResult:
    from pipelines.rm import tracking
    from pipelines.rm.store import canonical_pairs
    from pipelines.rm.launch import train_with_torchrun
    from pipelines.rm.model import load_reward_model
    from pipelines.rm.train import train_reward_model

    notes = []
    cfg = TrainConfig(**{**PAPER_DEFAULTS, "progress": False, **(settings or {})})
    if max_steps is not None:
        cfg.max_steps = max_steps
    source = PairSource([source_of(pairs)])
    say(f"[train-rm] pairs: {pairs} ({source.tables[0].layout} layout"
        f"{', Delta version %d' % source.tables[0].version if source.tables[0].version is not None else ''})")
    b = build_token_store(source, backbone, store_root or str(Path(out) / "token_store"), max_len=cfg.max_len,
                          policy=cfg.length_policy, parallel=build)
    say(f"[train-rm] token store {b.key}: {'reused' if b.reused else 'built'} in {b.seconds:.1f}s: "
        f"{b.counts['pairs']} pairs of {b.counts['rows']} rows ({b.counts['refused']} over max_len {cfg.max_len} "
        f"refused, {b.counts['invalid']} invalid, {b.counts['truncated']} truncated)")
    if cfg.batch_size > len(b.store):
        notes.append(f"batch_size {cfg.batch_size} > {len(b.store)} pairs: one global batch of {len(b.store)}")
        cfg.batch_size = len(b.store)
    val_rows: list[dict] = []
    if val:
        vt = source_of(val)
        df, _ = canonical_pairs(pl.from_arrow(vt.dataset().to_table()), vt.layout)  # a selection set: small
        val_rows = df.select("pair_id", "history", "chosen", "rejected").to_dicts()
    else:
        notes.append("no --val: no checkpoint selection, the last step's model is kept")
    for n in notes:
        say(f"[train-rm] note: {n}")
    t0 = time.time()
    with tracking.run(tracking_uri, experiment, run_name, None, tags={"role": "byo"}) as run:
        import mlflow

        mlflow.log_params({**{f"train.{k}": v for k, v in asdict(cfg).items()}, "backbone": backbone,
                           "pairs": pairs, "train_pairs": len(b.store), "val_pairs": len(val_rows),
                           "token_store": b.key})

        def log(rec, step):
            mlflow.log_metrics({k: float(v) for k, v in rec.items() if k != "step"}, step=step)

        if nproc > 1:
            res = train_with_torchrun(backbone, b.store, val_rows, cfg, out, nproc=nproc, log=log)
        else:
            res = train_reward_model(load_reward_model(backbone, dtype=torch.float32), b.store, val_rows, cfg, out,
                                     log=log)
        mlflow.log_metrics({"best_val_accuracy": res.best_val_accuracy, "tokens_per_s": res.tokens_per_s})
        version = tracking.log_model_folder(res.best_dir, register)
        run_id = run.info.run_id
    (Path(out) / "train_rm.json").write_text(json.dumps({"store": b.key, "counts": b.counts, "notes": notes,
                                                         "mlflow_run_id": run_id, "seconds": time.time() - t0}))
    return ByoResult(res, b.key, b.reused, b.counts, run_id, f"{register}:{version}" if register else None, notes)
