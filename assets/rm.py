"""The gold RM (paper §3.3 step 2): a Bradley–Terry RM trained only on human-verified pairs."""

import polars as pl

import dagster as dg
from assets.common import GPU_POOL, RMTrainConfig
from assets.meta import md_table, plt, png_md
from assets.review import human_verified_seed
from pipelines.review.seed import SEED
from pipelines.rm.registry import model_dir, train_and_register
from pipelines.rm.score import score_rows
from pipelines.settings import home
from resources.lake import LakeResource
from resources.mlflow import MlflowResource
from resources.trainer import TrainerResource


class GoldRMConfig(RMTrainConfig):
    epochs: float = 4.0


@dg.asset(group_name="reward_models", kinds={"pytorch", "mlflow"}, deps=[human_verified_seed], pool=GPU_POOL,
          tags={"gpu": "1"},
          check_specs=[dg.AssetCheckSpec("better_than_chance", asset="gold_rm", blocking=True,
                                         description="gold-slice accuracy above 0.5")],
          description="BT RM trained on the human-verified train split only, checkpoint picked by accuracy on "
                      "the held-out gold slice; logged and registered in MLflow.")
def gold_rm(context: dg.AssetExecutionContext, config: GoldRMConfig, lake_store: LakeResource,
            trainer: TrainerResource, mlflow_store: MlflowResource):
    lake = lake_store.lake()
    inputs = lake.input_versions([SEED])
    seed = lake.read(SEED).filter(pl.col("label_origin").is_in(["human", "simulated"]))
    train = seed.filter(pl.col("split") == "train").to_dicts()
    gold = seed.filter(pl.col("split") == "gold").to_dicts()
    reg = train_and_register(
        lake, tracking_uri=mlflow_store.uri, experiment=mlflow_store.experiment, name="synpref-gold-rm", role="gold",
        backbone=config.backbone_path(), train_rows=train, val_rows=gold, cfg=config.train_config(),
        out_dir=model_dir(home(), "gold_rm", context.run.run_id), train_fn=trainer.train,
        artifact_root=mlflow_store.artifacts, extra={"seed_version": inputs[SEED]})
    # what a person would rather look at: the margin distribution and accuracy per category on the gold slice
    scored, _ = score_rows(trainer.load(reg.path), gold, reg.rm_version, max_len=config.max_len)
    per_cat = (scored.join(seed.select("pair_id", "task_category"), on="pair_id", how="left")
               .group_by("task_category").agg(n=pl.len(), accuracy=(pl.col("margin") > 0).mean()).sort("task_category"))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 2.8))
    ax1.hist(scored["margin"].to_numpy(), bins=30, color="#4a7")
    ax1.axvline(0, color="k", lw=0.8)
    ax1.set_title("gold-slice reward margin r(chosen) - r(rejected)", fontsize=8)
    ax2.bar([str(c) for c in per_cat["task_category"]], per_cat["accuracy"].to_numpy(), color="#47a")
    ax2.set_ylim(0, 1)
    ax2.tick_params(axis="x", labelsize=6, rotation=30)
    ax2.set_title("accuracy per category", fontsize=8)
    lake.record_lineage(run_id=context.run.run_id, asset="gold_rm", partition=None, table="rm_registry",
                        version_written=lake.version("rm_registry"), inputs=inputs, config=config.model_dump(),
                        counts={"train": len(train), "gold": len(gold)})
    yield dg.MaterializeResult(
        metadata={"rm_version": reg.rm_version, "gold_accuracy": reg.val_accuracy, "train_pairs": len(train),
                  "gold_pairs": len(gold), "mlflow_run_id": reg.mlflow_run_id, "path": dg.MetadataValue.path(reg.path),
                  "tokens_per_s": reg.result.tokens_per_s, "plots": png_md(fig),
                  "accuracy_per_category": dg.MetadataValue.md(md_table(per_cat))},
        check_results=[dg.AssetCheckResult(check_name="better_than_chance", passed=reg.val_accuracy > 0.5,
                                           metadata={"gold_accuracy": reg.val_accuracy})])
