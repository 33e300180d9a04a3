"""The RM family trained on the curated mix (one asset per backbone of the catalog) and the Table-1 evaluation.

Why one asset per backbone rather than a partition per backbone: a Dagster job may hold only one partitions
definition, and the main job must run raw shard ingest (partitioned by shard) through the family and the report
in one run. An asset per backbone keeps what a partition gave (materialize one backbone alone, its own history
and metadata). The catalog is fixed in code (every asset is visible in the UI); each member's weights are its run
config `backbone`. `main_job` trains the CPU members; `family_job` every member."""

import re
from pathlib import Path

from pydantic import Field

import dagster as dg
from assets.common import GPU_POOL, RMTrainConfig, record_written, reward_models
from assets.ingest import benchmarks
from assets.meta import md_table, plt
from assets.rm import gold_rm
from pipelines.curate.stage2 import training_mix
from pipelines.evaluate.run import (benchmark_items_from_lake, evaluate_models, folder_drift, log_evaluation,
                                   models_to_evaluate, table1_text, write_all_authors_formats, write_evaluation,
                                   write_report)
from pipelines.rm.tiny import build_tiny_decoder
from pipelines.settings import home, minilm_path
from pipelines.tables import (BENCHMARK_ITEMS, CURATED, RECYCLED, RM_EVALUATION, RM_REGISTRY, RM_REWARDS, SEED,
                              SILVER)
from resources.compute import ComputeResource
from resources.lake import LakeResource
from resources.mlflow import MlflowResource
from resources.trainer import TrainerResource

# The family catalog: one asset per backbone. The CPU members run in `main_job` on the embedded default; the
# paper's members (Qwen3 0.6B-8B, Llama 3.x) are in `family_job` for GPU machines. Each member's weights come from
# its config's `backbone` (a hub id resolved from the local cache, or a local mirror folder), shown in the UI.
CATALOG = {
    "minilm": "minilm", "tiny-qwen3": "tiny-qwen3",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B", "qwen3-1.7b": "Qwen/Qwen3-1.7B", "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-8b": "Qwen/Qwen3-8B", "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct", "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
}
CPU_MEMBERS = ["minilm", "tiny-qwen3"]


def family_key(name: str) -> dg.AssetKey:
    """rm_family/<backbone> (asset key parts allow [A-Za-z0-9_] only)."""
    return dg.AssetKey(["rm_family", re.sub(r"[^A-Za-z0-9_]", "_", name)])


def resolve_backbone(src: str) -> str:
    """A catalog source -> a loadable folder or hub id (the two CPU members are built or shipped locally)."""
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

    class MemberConfig(FamilyConfig):
        backbone: str = Field(default=CATALOG[name], description="Hub id (from the local cache) or local folder; "
                                                                 "'minilm' / 'tiny-qwen3' are built locally")

    MemberConfig.__name__ = f"FamilyConfig_{re.sub(r'[^A-Za-z0-9_]', '_', name)}"

    @dg.asset(key=family_key(name), group_name="reward_models", kinds={"pytorch", "mlflow"},
              deps=[CURATED, RECYCLED], pool=GPU_POOL, tags={"gpu": "1"},
              description=f"BT RM on backbone {name} ({CATALOG[name]}) trained on the curated mix, checkpoint "
                          f"picked on gold_val, registered in MLflow as synpref-rm-{name}.")
    def _member(context: dg.AssetExecutionContext, config: MemberConfig, lake_store: LakeResource,
                trainer: TrainerResource, mlflow_store: MlflowResource,
                compute: ComputeResource) -> dg.MaterializeResult:
        lake = lake_store.lake()
        rms = reward_models(lake, config, trainer, mlflow_store, backbone=resolve_backbone(config.backbone),
                            context=context, compute=compute)
        inputs = lake.input_versions([CURATED, RECYCLED, SEED])
        source, val = training_mix(lake, home() / "mixes", include_recycled=config.include_recycled)
        reg = rms.train(name=f"synpref-rm-{name}", role="family", train=source, val=val,
                        extra={"curated_version": inputs[CURATED], "include_recycled": config.include_recycled})
        res = reg.result
        counts = {"train": res.pairs, "gold_val": val.height, "steps": res.steps,
                  "resumed_from_step": res.resumed_from_step, "pairs_without_margin": res.pairs_without_margin}
        written = record_written(context, lake, "rm_family", RM_REGISTRY, inputs={**inputs, "token_store": res.data_key},
                                 config=config.model_dump(), counts=counts, partition=name, identity=reg.rm_version)
        return dg.MaterializeResult(data_version=written.data_version, metadata={**written.metadata,
            "rm_version": reg.rm_version, "gold_val_accuracy": reg.val_accuracy, "train_pairs": res.pairs,
            "tokens_per_s": res.tokens_per_s, "world_size": res.world_size, "steps": res.steps,
            "resumed_from_step": res.resumed_from_step, "token_store": res.data_key,
            "length": dg.MetadataValue.json(res.length), "mlflow_run_id": reg.mlflow_run_id,
            "backbone": config.backbone, "model_dir": str(Path(res.best_dir).parent)})

    return _member


class EvalConfig(dg.Config):
    max_len_cap: int = Field(default=4096, description="Each model is scored at its own context length, capped here")
    benchmarks_dir: str = Field(default="", description="Folder of benchmark folders; default <SYNPREF_HOME>/benchmarks")


@dg.asset(group_name="evaluation", kinds={"deltalake", "mlflow"},
          deps=[*(family_key(b) for b in CATALOG), gold_rm, SILVER, SEED, benchmarks],
          check_specs=[dg.AssetCheckSpec("no_leaks", asset="rm_evaluation", blocking=True,
                                         description="no reported pair is in any RM's training or selection rows")],
          description="Every family member, the gold RM and the best Stage-1 RM on every benchmark (scored as its "
                      "authors' script does, each distinct text once, on the Ray path) plus gold_test: scores per "
                      "section, per-item rewards (rm_item_rewards), counted truncation, Table 1 report and plot.")
def rm_evaluation(context: dg.AssetExecutionContext, config: EvalConfig, lake_store: LakeResource,
                  compute: ComputeResource, mlflow_store: MlflowResource):
    lake = lake_store.lake()
    folder = Path(config.benchmarks_dir) if config.benchmarks_dir else home() / "benchmarks"
    # one reader: the items decontamination used (`benchmark_pairs`, written by `benchmarks`), at the version the
    # lineage records; a file added to the folder since is named here, not scored unchecked
    inputs = lake.input_versions([BENCHMARK_ITEMS, SEED, RM_REGISTRY])
    try:
        items = benchmark_items_from_lake(lake, inputs[BENCHMARK_ITEMS])
    except FileNotFoundError as e:
        raise dg.Failure(str(e)) from e
    drift = folder_drift(items, folder) if folder.exists() else {}
    if drift:
        context.log.warning(f"{folder} differs from `{BENCHMARK_ITEMS}` (not decontaminated, not scored until "
                            f"`benchmarks` and ingest run again): {drift}")
    refs = models_to_evaluate(lake, list(CATALOG), mlflow_store.uri, home() / "model_cache")
    engine = compute.make_engine(max_len=config.max_len_cap)
    ev = evaluate_models(lake, items, refs, engine, max_len_cap=config.max_len_cap)
    v = write_evaluation(lake, ev)
    report = write_report(ev, home() / "reports", md_table, plt)
    authors = write_all_authors_formats(ev, home() / "reports" / "authors")
    log_evaluation(ev, report, authors, mlflow_store.uri, mlflow_store.experiment, mlflow_store.artifacts)
    written = record_written(context, lake, "rm_evaluation", RM_EVALUATION, inputs=inputs, config=config.model_dump(),
                             counts={"rows": ev.results.height, "models": len(refs), "items": items.height}, version=v)
    yield dg.MaterializeResult(data_version=written.data_version, metadata={**written.metadata,
        "table1": dg.MetadataValue.md(table1_text(ev, md_table)),
        "in_distribution": dg.MetadataValue.md(md_table(ev.in_distribution)),
        "lengths": dg.MetadataValue.md(md_table(ev.lengths)), "biases": dg.MetadataValue.md(md_table(ev.bias)), "plot": dg.MetadataValue.path(str(report.with_suffix(".png"))),
        "report": dg.MetadataValue.path(str(report)), "authors_files": dg.MetadataValue.path(str(authors)),
        "models": len(refs), "items": items.height, "benchmark_pairs_version": inputs[BENCHMARK_ITEMS],
        "folder_not_in_benchmark_pairs": dg.MetadataValue.json(drift),
        "rewards_table": RM_REWARDS, "engine": engine.describe()})
    yield dg.AssetCheckResult(check_name="no_leaks", passed=ev.leaks.height == 0,
                              metadata={"leaked_pairs": ev.leaks.height,
                                        "by_model": dg.MetadataValue.json(
                                            dict(ev.leaks.group_by("rm_version").len().iter_rows()))})


FAMILY_MEMBERS = {b: family_member(b) for b in CATALOG}
FAMILY_ASSETS = [*FAMILY_MEMBERS.values(), rm_evaluation]
