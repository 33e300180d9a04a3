"""The gold RM (paper §3.3 step 2): a Bradley–Terry RM trained only on human-verified pairs."""

from pathlib import Path

import polars as pl

import dagster as dg
from assets.common import GPU_POOL, RMTrainConfig, record_written, reward_models
from assets.meta import margin_and_category_plot, md_table, png_md
from assets.review import human_verified_seed
from pipelines.evaluate.harness import pairwise_accuracy
from pipelines.review.seed import SEED
from pipelines.rm.store import PairSource, SourceTable
from pipelines.tables import RM_REGISTRY
from resources.compute import ComputeResource
from resources.lake import LakeResource
from resources.mlflow import MlflowResource
from resources.trainer import TrainerResource


class GoldRMConfig(RMTrainConfig):
    epochs: float = 4.0


@dg.asset(group_name="reward_models", kinds={"pytorch", "mlflow"}, deps=[human_verified_seed], pool=GPU_POOL,
          tags={"gpu": "1"},
          check_specs=[dg.AssetCheckSpec("better_than_chance", asset="gold_rm", blocking=True,
                                         description="gold_val accuracy above 0.5")],
          description="BT RM trained on the human-verified train split only, checkpoint picked by accuracy on "
                      "gold_val; accuracy per category shown on gold_test (held out); registered in MLflow.")
def gold_rm(context: dg.AssetExecutionContext, config: GoldRMConfig, lake_store: LakeResource,
            trainer: TrainerResource, mlflow_store: MlflowResource, compute: ComputeResource):
    lake = lake_store.lake()
    inputs = lake.input_versions([SEED])
    human = pl.col("label_origin").is_in(["human", "simulated"])
    seed = lake.read(SEED, version=inputs[SEED]).filter(human)
    train, val, test = (seed.filter(pl.col("split") == s) for s in ("train", "gold_val", "gold_test"))
    source = PairSource([SourceTable(lake.uri(SEED), inputs[SEED], lake.storage_options,
                                     where=human & (pl.col("split") == "train"))])
    rms = reward_models(lake, config, trainer, mlflow_store, context=context, compute=compute)
    reg = rms.train(name="synpref-gold-rm", role="gold", train=source, val=val,
                    extra={"seed_version": inputs[SEED]})
    # what a person would rather look at: the margin distribution and accuracy per category, on held-out pairs
    scored = rms.score(reg.rm_version, test) if test.height else pl.DataFrame(schema={"pair_id": pl.String,
                                                                                        "margin": pl.Float64})
    per_cat = pairwise_accuracy(scored.join(seed.select("pair_id", "task_category"), on="pair_id", how="left"),
                                "task_category")
    written = record_written(context, lake, "gold_rm", RM_REGISTRY, inputs=inputs, config=config.model_dump(),
                             counts={"train": train.height, "gold_val": val.height, "gold_test": test.height},
                             identity=reg.rm_version)
    yield dg.MaterializeResult(
        data_version=written.data_version,
        metadata={**written.metadata, "rm_version": reg.rm_version, "gold_val_accuracy": reg.val_accuracy,
                  "gold_test_accuracy": float(pairwise_accuracy(scored)["accuracy"][0]) if scored.height else 0.0,
                  "train_pairs": train.height, "gold_val_pairs": val.height, "gold_test_pairs": test.height,
                  "mlflow_run_id": reg.mlflow_run_id, "model_uri": reg.model_uri,
                  "tokens_per_s": reg.result.tokens_per_s, "world_size": reg.result.world_size,
                  "steps": reg.result.steps, "resumed_from_step": reg.result.resumed_from_step,
                  "token_store": reg.result.data_key, "model_dir": str(Path(reg.result.best_dir).parent),
                  "plots": png_md(margin_and_category_plot(scored, per_cat, "gold_test")),
                  "accuracy_per_category": dg.MetadataValue.md(md_table(per_cat))},
        check_results=[dg.AssetCheckResult(check_name="better_than_chance", passed=reg.val_accuracy > 0.5,
                                           metadata={"gold_val_accuracy": reg.val_accuracy})])
