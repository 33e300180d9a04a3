"""Sources and ingestion: project-made landing shards, benchmark tables, and `raw_pairs` per landed shard."""


from collections import Counter
from pathlib import Path

import dagster as dg
import polars as pl
import pyarrow as pa
from pydantic import Field

from pipelines.evaluate.benchmarks import BENCHMARK_SCHEMA, BenchmarkFormatError, read_benchmarks
from pipelines.ingest.checks import has_canonical_schema
from pipelines.ingest.idstore import IdStore
from pipelines.ingest.run import DUPLICATES, QUARANTINE, RAW, decontam_index_from_lake, ingest_shard
from pipelines.tables import BENCHMARK_ITEMS, BENCHMARK_PROMPTS, SYNTH_TRUTH
from pipelines.schema import RAW_PAIRS_SCHEMA, first_user_turn
from pipelines.settings import home
from pipelines.synth.generator import land_synthetic
from assets.common import record_written
from assets.meta import md_table
from resources.lake import LakeResource

raw_shards = dg.DynamicPartitionsDefinition(name="raw_shards")

BENCHMARK_PROMPTS_SCHEMA = pa.schema([("benchmark", pa.string()), ("prompt", pa.string())])


class SyntheticConfig(dg.Config):
    n_pairs: int = Field(default=3000, description="Pairs across all landing shards (the in-the-wild pool)")
    n_shards: int = Field(default=2, description="Landing shards to write under <landing>/synth/")
    label_noise: float = Field(default=0.25, description="Fraction of pairs shipped with chosen/rejected swapped")
    bad_rows: int = Field(default=8, description="Unusable rows per shard (exercise the quarantine)")
    benchmark_pairs: int = Field(default=300, description="Held-out benchmark pairs (clean labels)")
    contaminated: int = Field(default=5, description="Landing pairs whose prompt copies a benchmark prompt")
    seed: int = 0


@dg.multi_asset(
    group_name="sources", name="synthetic_landing", can_subset=True,
    specs=[dg.AssetSpec("synthetic_landing", kinds={"python", "jsonl"},
                        description="Project-made verifiable pairs with known truth: the embedded default's D_wild "
                                    "(landing shards + a benchmark file)."),
           dg.AssetSpec(SYNTH_TRUTH, kinds={"deltalake"},
                        description="Whether each project-made pair ships with its right label, and its category: "
                                    "read only by the simulated reviewer/judges and the known-truth figures.")])
def synthetic_landing(context: dg.AssetExecutionContext, config: SyntheticConfig, lake_store: LakeResource):
    lake = lake_store.lake()
    landing = Path(lake_store.landing)
    if "://" in lake_store.landing:
        raise dg.Failure("synthetic_landing writes a local landing folder; point landing_root at a local path")
    landed = land_synthetic(lake, landing, home() / "benchmarks" / "synth-bench", n_pairs=config.n_pairs,
                            n_shards=config.n_shards, label_noise=config.label_noise, bad_rows=config.bad_rows,
                            benchmark_pairs=config.benchmark_pairs, contaminated=config.contaminated, seed=config.seed)
    written = record_written(context, lake, "synthetic_landing", SYNTH_TRUTH, inputs={}, config=config.model_dump(),
                             counts={"pairs": landed.pairs, "shards": len(landed.keys)}, version=landed.truth_version)
    # Register the shards as raw_pairs partitions right away (the landing sensor would find them too, later).
    context.instance.add_dynamic_partitions(raw_shards.name, landed.keys)
    # one function writes both (the truth is a by-product of generating the shards): selecting either runs it
    selected = {k.to_user_string() for k in context.selected_asset_keys}
    if "synthetic_landing" in selected:
        yield dg.MaterializeResult(asset_key="synthetic_landing", metadata={
            "pairs": landed.pairs, "shards": config.n_shards, "landing": dg.MetadataValue.path(str(landing))})
    if SYNTH_TRUTH in selected:
        yield dg.MaterializeResult(asset_key=SYNTH_TRUTH, data_version=written.data_version,
                                   metadata={"rows": landed.pairs, **written.metadata})


class BenchmarksConfig(dg.Config):
    directory: str = Field(default="", description="Folder of benchmark folders (<name>/<published files>, put there "
                                                   "by `synpref benchmarks add|fetch`); default <SYNPREF_HOME>/benchmarks")


@dg.asset(group_name="sources", kinds={"deltalake"}, deps=[synthetic_landing],
          description="Benchmark items as their authors publish them (RewardBench 1/2, RM-Bench, JudgeBench, PPE, RMB; "
                      "a file of another layout is refused) and their first-turn prompts (decontamination input).")
def benchmarks(context: dg.AssetExecutionContext, config: BenchmarksConfig,
               lake_store: LakeResource) -> dg.MaterializeResult:
    lake = lake_store.lake()
    folder = Path(config.directory) if config.directory else home() / "benchmarks"
    try:
        rows, stats = read_benchmarks(folder)
    except BenchmarkFormatError as e:
        raise dg.Failure(str(e)) from e
    for i, r in enumerate(rows):  # item ids unique across benchmarks in the table
        r["item_id"] = i
    bench = pa.Table.from_pylist(rows, BENCHMARK_SCHEMA)
    prompts = pa.Table.from_pylist(
        [{"benchmark": r["benchmark"], "prompt": first_user_turn(r["history"])} for r in rows], BENCHMARK_PROMPTS_SCHEMA)
    v1 = lake.overwrite(BENCHMARK_ITEMS, bench, BENCHMARK_SCHEMA)
    v2 = lake.overwrite(BENCHMARK_PROMPTS, prompts, BENCHMARK_PROMPTS_SCHEMA)
    per = pl.from_arrow(bench).group_by("benchmark").len().sort("benchmark")
    written = [record_written(context, lake, "benchmarks", table, inputs={}, config={"directory": str(folder)},
                              counts={"rows": len(rows)}, version=version)
               for table, version in ((BENCHMARK_ITEMS, v1), (BENCHMARK_PROMPTS, v2))]
    return dg.MaterializeResult(metadata={"items": len(rows), "per_benchmark": dg.MetadataValue.md(md_table(per)),
                                          "files": dg.MetadataValue.json(stats), **written[0].metadata},
                                data_version=written[0].data_version)


class RawPairsConfig(dg.Config):
    format: str = Field(default="", description="hh | trl | ultrafeedback | judgebench; empty = detect per file")
    mapping: dict[str, str] = Field(default_factory=dict,
                                    description="Canonical field -> source column, e.g. {'prompt': 'question'}")
    max_chars: int = Field(default=200_000, description="Pairs longer than this (all text) are quarantined")
    decontaminate: bool = Field(default=True, description="Drop pairs sharing a 13-gram with benchmark prompts")


RAW_CHECKS = [
    dg.AssetCheckSpec("schema_matches", asset="raw_pairs", blocking=True,
                      description="raw_pairs has the canonical schema"),
    dg.AssetCheckSpec("pair_id_unique", asset="raw_pairs", blocking=True,
                      description="no pair_id appears twice anywhere in raw_pairs"),
    dg.AssetCheckSpec("counts_reconcile", asset="raw_pairs", blocking=True,
                      description="in = kept + already present + duplicates + quarantined"),
]


@dg.asset(partitions_def=raw_shards, group_name="ingest", kinds={"deltalake", "polars"}, deps=[benchmarks],
          check_specs=RAW_CHECKS, pool="ingest", backfill_policy=dg.BackfillPolicy.single_run(),
          description="Canonical pairs from landed shards: parsed, checked, decontaminated, deduplicated "
                      "(MERGE semantics: re-ingest is a no-op). Partition key = <source>/<file> under landing. "
                      "A backfill over many shards runs as one run (one decontamination index, one process).")
def raw_pairs(context: dg.AssetExecutionContext, config: RawPairsConfig, lake_store: LakeResource):
    lake = lake_store.lake()
    decontam = decontam_index_from_lake(lake) if config.decontaminate else None
    # the dedup index persisted on the lake (idstore.py): memory-mapped, not rebuilt by a scan of every id, and
    # committed after each shard, so a shard costs the same however large raw_pairs is
    store = IdStore(lake)
    index = store.open()
    if store.rebuilt:
        context.log.info(f"dedup index rebuilt from a scan of raw_pairs ({len(index)} ids)")
    reports = []
    for key in context.partition_keys:
        source = key.split("/", 1)[0]
        inputs = lake.input_versions([BENCHMARK_PROMPTS, RAW])
        report = ingest_shard(lake, lake_store.landing_path(key), source=source, shard=key,
                              run_id=context.run.run_id, fmt=config.format or None, mapping=config.mapping or None,
                              decontam=decontam, max_chars=config.max_chars, id_index=index)
        store.commit(index, report.version)
        written = record_written(context, lake, "raw_pairs", RAW, inputs=inputs, config=config.model_dump(),
                                 counts=_counts(report), partition=key, version=report.version)
        context.log.info(f"{key}: {_counts(report)}")
        reports.append(report)

    counts = _sum(_counts(r) for r in reports)
    by_reason = _sum(r.quarantine_by_reason for r in reports)
    by_bench = _sum(r.contaminated_by_benchmark for r in reports)
    # unique ids, checked on the run's index (the table's ids at the start + every row this run wrote) rather
    # than by n_unique over the whole table each run; the table's row count must equal the index's size
    ids = (written.rows, len(index) - index.duplicate_keys(), len(index))
    bad = [r.shard for r in reports if not r.reconciles]
    yield dg.MaterializeResult(
        data_version=written.data_version,
        metadata={**counts, "shards": len(reports), "format": ",".join(sorted({r.format for r in reports})),
                  **written.metadata,
                  "quarantine_by_reason": dg.MetadataValue.json(by_reason),
                  "contaminated_by_benchmark": dg.MetadataValue.json(by_bench)},
        check_results=[
            dg.AssetCheckResult(check_name="schema_matches", passed=has_canonical_schema(lake, RAW)),
            dg.AssetCheckResult(check_name="pair_id_unique", passed=ids[0] == ids[1] == ids[2],
                                metadata={"rows": ids[0], "unique": ids[1], "indexed": ids[2]}),
            dg.AssetCheckResult(check_name="counts_reconcile", passed=not bad,
                                metadata={**{k: counts[k] for k in ("candidates", "kept", "already_present",
                                                                    "duplicates", "quarantined")},
                                          "shards_not_reconciling": dg.MetadataValue.json(bad)}),
        ],
    )


def _sum(dicts) -> dict[str, int]:
    """Key-wise sum over shards (Counter.update keeps zero counts; `+` would drop them)."""
    total: Counter = Counter()
    for d in dicts:
        total.update(d)
    return dict(total)


def _counts(report) -> dict[str, int]:
    return {k: v for k, v in report.as_dict().items()
            if isinstance(v, int) and not isinstance(v, bool) and k != "version"}


INGEST_ASSETS = [synthetic_landing, benchmarks, raw_pairs]
__all__ = ["INGEST_ASSETS", "raw_shards", "QUARANTINE", "DUPLICATES", "RAW_PAIRS_SCHEMA"]
