"""The RM family trained on the curated mix (one asset per backbone) and the Table-1-style evaluation.

Why one asset per backbone rather than a partition per backbone: a Dagster job may hold only one partitions
definition, and the main job must run raw shard ingest (partitioned by shard) through the family and the report
in one run. An asset per backbone keeps what a partition gave (materialize one backbone alone, its own history
and metadata) and lets `main_job` select everything."""

import os
import re

import polars as pl
from pydantic import Field

import dagster as dg
from assets.common import GPU_POOL, RMTrainConfig
from assets.curate import stage2
from assets.ingest import benchmarks
from assets.meta import md_table, plt, png_md
from assets.rm import gold_rm
from pipelines.curate.stage2 import CURATED, RECYCLED
from pipelines.evaluate.harness import RESULT_SCHEMA, evaluate, table1
from pipelines.review.seed import SEED
from pipelines.rm import tracking
from pipelines.rm.registry import best_of, latest, model_dir, train_and_register
from pipelines.rm.tiny import build_tiny_decoder
from pipelines.settings import home, minilm_path
from resources.lake import LakeResource
from resources.mlflow import MlflowResource
from resources.trainer import TrainerResource

# Backbone name -> where its weights come from. The CPU default family is small; the production names are
# the paper's (load from the hub cache or a local mirror: set SYNPREF_BACKBONE_<NAME>=/path to override).
BACKBONES = {
    "minilm": "minilm", "tiny-qwen3": "tiny-qwen3",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B", "qwen3-1.7b": "Qwen/Qwen3-1.7B", "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-8b": "Qwen/Qwen3-8B", "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct", "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
}
FAMILY = [b.strip() for b in os.environ.get("SYNPREF_RM_FAMILY", "minilm,tiny-qwen3").split(",") if b.strip()]


def family_key(name: str) -> dg.AssetKey:
    """rm_family/<backbone> (asset key parts allow [A-Za-z0-9_] only)."""
    return dg.AssetKey(["rm_family", re.sub(r"[^A-Za-z0-9_]", "_", name)])


def resolve_backbone(name: str) -> str:
    override = os.environ.get("SYNPREF_BACKBONE_" + name.upper().replace("-", "_").replace(".", "_"))
    if override:
        return override
    src = BACKBONES.get(name, name)
    if src == "minilm":
        return minilm_path()
    if src == "tiny-qwen3":
        path = home() / "backbones" / "tiny-qwen3"
        if not (path / "config.json").exists():
            build_tiny_decoder(path, "qwen3", hidden=128, layers=2)
        return str(path)
    return src


class FamilyConfig(RMTrainConfig):
    epochs: float = 1.0
    include_recycled: bool = Field(default=False, description="Train on curated + flipped discards (the 40M mix)")


def family_member(name: str) -> dg.AssetsDefinition:
    """The asset that trains backbone `name` on the curated mix and registers it as synpref-rm-<name>."""

    @dg.asset(key=family_key(name), group_name="reward_models", kinds={"pytorch", "mlflow"},
              deps=[stage2], pool=GPU_POOL, tags={"gpu": "1"},
              description=f"BT RM on backbone {name} ({BACKBONES.get(name, name)}) trained on the curated mix, "
                          f"checkpoint picked on the gold slice, registered in MLflow as synpref-rm-{name}.")
    def _member(context: dg.AssetExecutionContext, config: FamilyConfig, lake_store: LakeResource,
                trainer: TrainerResource, mlflow_store: MlflowResource) -> dg.MaterializeResult:
        return train_member(context, name, config, lake_store, trainer, mlflow_store)

    return _member


def train_member(context: dg.AssetExecutionContext, name: str, config: FamilyConfig, lake_store: LakeResource,
                 trainer: TrainerResource, mlflow_store: MlflowResource) -> dg.MaterializeResult:
    lake = lake_store.lake()
    train = lake.read(CURATED)
    if config.include_recycled and lake.exists(RECYCLED):
        train = pl.concat([train, lake.read(RECYCLED)], how="diagonal_relaxed")
    cols = ["pair_id", "history", "chosen", "rejected"]
    gold = lake.read(SEED).filter(pl.col("split") == "gold").select(cols)
    train = train.filter(~pl.col("pair_id").is_in(gold["pair_id"].to_list())).select(cols)
    reg = train_and_register(
        lake, tracking_uri=mlflow_store.uri, experiment=mlflow_store.experiment, name=f"synpref-rm-{name}",
        role="family", backbone=resolve_backbone(config.backbone or name), train_rows=train.to_dicts(),
        val_rows=gold.to_dicts(), cfg=config.train_config(),
        out_dir=model_dir(home(), f"family-{name}", context.run.run_id), train_fn=trainer.train,
        artifact_root=mlflow_store.artifacts, extra={"curated_version": lake.version(CURATED),
                                                     "include_recycled": config.include_recycled})
    lake.record_lineage(run_id=context.run.run_id, asset="rm_family", partition=name, table="rm_registry",
                        version_written=lake.version("rm_registry"),
                        inputs=lake.input_versions([CURATED, RECYCLED, SEED]), config=config.model_dump(),
                        counts={"train": train.height, "gold": gold.height})
    return dg.MaterializeResult(metadata={"rm_version": reg.rm_version, "gold_accuracy": reg.val_accuracy,
                                          "train_pairs": train.height, "tokens_per_s": reg.result.tokens_per_s,
                                          "mlflow_run_id": reg.mlflow_run_id})


class EvalConfig(dg.Config):
    max_len: int = 256
    include_gold_slice: bool = Field(default=True, description="Also score the held-out human gold slice")


@dg.asset(group_name="evaluation", kinds={"deltalake", "mlflow"},
          deps=[*(family_key(b) for b in FAMILY), gold_rm, benchmarks],
          description="Every family member, the gold RM and the best Stage-1 RM on every benchmark table plus the "
                      "gold slice: per-section accuracy (Delta), a Table-1 Markdown report and a plot.")
def rm_evaluation(context: dg.AssetExecutionContext, config: EvalConfig, lake_store: LakeResource,
                  trainer: TrainerResource, mlflow_store: MlflowResource) -> dg.MaterializeResult:
    lake = lake_store.lake()
    bench = lake.read("benchmark_pairs") if lake.exists("benchmark_pairs") else pl.DataFrame()
    if config.include_gold_slice:
        g = lake.read(SEED).filter(pl.col("split") == "gold")
        gb = g.select(benchmark=pl.lit("gold-slice"), item_id=pl.int_range(pl.len(), dtype=pl.Int64),
                      section=pl.col("task_category").fill_null("other"), subset=pl.lit(""), history="history",
                      chosen="chosen", rejected=pl.concat_list("rejected"),
                      chosen_more=pl.lit([], dtype=pl.List(pl.String)), item_key=pl.col("pair_id"))
        bench = pl.concat([bench, gb], how="diagonal_relaxed") if bench.height else gb  # older tables lack columns
    models = [latest(lake, name=f"synpref-rm-{b}") for b in FAMILY]
    models += [latest(lake, role="gold"), best_of(lake, "stage1")]
    models = [m for m in models if m is not None]
    results = []
    for m in models:
        res, _ = evaluate(trainer.load(m["path"]), bench, m["rm_version"], config.max_len)
        results.append(res)
    results = pl.concat(results) if results else pl.DataFrame(schema=RESULT_SCHEMA)
    v = lake.upsert("rm_evaluation", results.to_arrow(), keys=["rm_version", "benchmark", "section"])["version"]
    t1 = table1(results)
    report = "# RM evaluation (paper Table 1 shape)\n\n" + md_table(t1) + "\n\n## Per section\n\n" + md_table(
        results.sort("rm_version", "benchmark", "section")) + "\n"
    out = home() / "reports"
    out.mkdir(parents=True, exist_ok=True)
    (out / "rm_evaluation.md").write_text(report)
    fig, ax = plt.subplots(figsize=(6, 3))
    ov = results.filter(pl.col("section") == "overall")
    for i, (bm, grp) in enumerate(ov.group_by("benchmark", maintain_order=True)):
        ax.bar([f"{r}\n{bm[0]}" for r in grp["rm_version"]], grp["accuracy"], label=bm[0])
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("accuracy")
    ax.tick_params(axis="x", labelsize=6, rotation=30)
    ax.legend(fontsize=7)
    fig.savefig(out / "rm_evaluation.png", dpi=90, bbox_inches="tight")
    with tracking.run(mlflow_store.uri, mlflow_store.experiment, "rm-evaluation", mlflow_store.artifacts,
                      tags={"role": "evaluation"}):
        import mlflow

        for r in ov.iter_rows(named=True):
            mlflow.log_metric(f"{r['rm_version'].replace(':', '_v')}.{r['benchmark']}", r["accuracy"])
        mlflow.log_artifact(str(out / "rm_evaluation.md"))
        mlflow.log_artifact(str(out / "rm_evaluation.png"))
    lake.record_lineage(run_id=context.run.run_id, asset="rm_evaluation", partition=None, table="rm_evaluation",
                        version_written=v, inputs=lake.input_versions(["benchmark_pairs", SEED, "rm_registry"]),
                        config=config.model_dump(), counts={"rows": results.height, "models": len(models)})
    return dg.MaterializeResult(metadata={"table1": dg.MetadataValue.md(md_table(t1)), "plot": png_md(fig),
                                          "report": dg.MetadataValue.path(str(out / "rm_evaluation.md")),
                                          "models": len(models), "delta_version": v})


FAMILY_MEMBERS = [family_member(b) for b in FAMILY]
FAMILY_ASSETS = [*FAMILY_MEMBERS, rm_evaluation]
