"""`synpref` command line: the end-to-end demo on the embedded default, and the review app.

    synpref demo                       # everything, on project-made data, CPU, local lake/Dagster/MLflow
    synpref review add-annotator NAME [--lead]
    synpref review serve [--port 8000]
    synpref review export FILE [--format jsonl|csv|labelstudio]
    synpref review import FILE [--format jsonl|csv|labelstudio]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pipelines.settings import default_lake_root, default_mlflow_uri, home


def _instance():
    import dagster as dg

    dh = Path(os.environ.setdefault("DAGSTER_HOME", str(home() / "dagster")))
    dh.mkdir(parents=True, exist_ok=True)
    cfg = dh / "dagster.yaml"
    if not cfg.exists():
        src = Path(__file__).resolve().parents[1] / "dagster.yaml"
        cfg.write_text(src.read_text() if src.exists() else "telemetry:\n  enabled: false\n")
    return dg.DagsterInstance.get()


def demo_run_config(scale: str) -> dict:
    """Sizes for the embedded default. `small` is what the README's first command runs (minutes on 2 cores)."""
    n = {"tiny": 600, "small": 2400, "medium": 6000}[scale]
    q = {"tiny": 120, "small": 260, "medium": 500}[scale]
    return {
        "synthetic": {"n_pairs": n, "n_shards": 2, "benchmark_pairs": 200 if scale == "tiny" else 300},
        "queue": q,
        "stage1_iterations": 1 if scale == "tiny" else 2,
        "family_epochs": 1.0,
    }


def _ok(result, what: str) -> None:
    if not result.success:
        raise SystemExit(f"{what} failed (see the Dagster UI / logs above)")


def demo(scale: str = "small") -> dict:
    """Run `main_job` once over every synthetic shard: the whole pipeline is one Dagster run."""
    from assets.family import FAMILY, family_key
    from assets.ingest import raw_shards
    from definitions import defs
    from pipelines.lake import Lake
    from pipelines.synth.generator import synthetic_shard_keys

    t0 = time.time()
    instance = _instance()
    cfg = demo_run_config(scale)
    print(f"[synpref] data directory: {home()}", flush=True)
    # The shard names are known before synthetic_landing writes them, so one run can write and ingest them.
    shards = synthetic_shard_keys(cfg["synthetic"]["n_shards"])
    instance.add_dynamic_partitions(raw_shards.name, shards)
    ops = {
        "synthetic_landing": {"config": cfg["synthetic"]},
        "review_queue": {"config": {"size": cfg["queue"]}},
        "stage1": {"config": {"iterations": cfg["stage1_iterations"]}},
        **{family_key(b).to_python_identifier(): {"config": {"epochs": cfg["family_epochs"]}} for b in FAMILY},
    }
    tags = {"dagster/asset_partition_range_start": shards[0], "dagster/asset_partition_range_end": shards[-1]}
    result = defs.get_job_def("main_job").execute_in_process(instance=instance, run_config={"ops": ops}, tags=tags)
    _ok(result, "main_job")
    print(f"[synpref] main_job run {result.run_id} succeeded ({time.time() - t0:.0f}s)", flush=True)
    report = home() / "reports" / "rm_evaluation.md"
    lake = Lake(default_lake_root())
    summary = {"seconds": round(time.time() - t0), "report": str(report)}
    print("\n" + report.read_text().split("## Per section")[0], flush=True)
    curated = [m for m in result.asset_materializations_for_node("stage2") if m.asset_key.path == ["curated_pairs"]]
    meta = {k: v.value for k, v in curated[0].metadata.items()} if curated else {}
    if "kept_label_precision" in meta:  # project-made data carries its truth: how much cleaner did Stage 2 make it?
        print(f"[synpref] Stage 2 on {meta['pool']} pool pairs (known truth): label precision "
              f"{meta['pool_label_precision']:.3f} -> {meta['kept_label_precision']:.3f} in the {meta['kept_stage2']} "
              f"kept; wrong labels found: recall {meta['flip_detection_recall']:.3f}, precision "
              f"{meta['flip_detection_precision']:.3f} ({meta['recycled']} flipped into recycled_pairs)", flush=True)
    print(f"[synpref] finished in {summary['seconds']}s. Where to look:\n"
          f"  Dagster UI : make ui   (DAGSTER_HOME={os.environ['DAGSTER_HOME']}) -> http://127.0.0.1:3000\n"
          f"  MLflow UI  : .venv/bin/mlflow ui --backend-store-uri {default_mlflow_uri()}\n"
          f"  Report     : {report} (+ rm_evaluation.png)\n"
          f"  Lake       : {lake.root} (Delta tables; lineage in {lake.root}/lineage)", flush=True)
    return summary


def review(args: argparse.Namespace) -> None:
    from pipelines.lake import Lake
    from pipelines.review.app import add_annotator, create_app

    annotators = home() / "review" / "annotators.json"
    if args.review_cmd == "add-annotator":
        token = add_annotator(annotators, args.name, "lead" if args.lead else "annotator")
        print(f"token for {args.name} (shown once, stored hashed): {token}")
    elif args.review_cmd == "serve":
        import uvicorn

        uvicorn.run(create_app(default_lake_root(), annotators), host=args.host, port=args.port)
    elif args.review_cmd == "export":
        import polars as pl

        from pipelines.review.exchange import export_tasks
        from pipelines.review.queue import QUEUE

        lake = Lake(default_lake_root())
        q = lake.read(QUEUE)
        q = q.filter(pl.col("queue_version") == q["queue_version"].max())
        items = q.join(lake.read("raw_pairs"), on="pair_id")
        if lake.exists("llm_annotations"):
            ann = lake.read("llm_annotations").filter(pl.col("status") == "ok").unique("pair_id").select("pair_id", "guideline")
            items = items.join(ann, on="pair_id", how="left")
        print(f"exported {export_tasks(items, args.file, args.format)} tasks to {args.file}")
    elif args.review_cmd == "import":
        from pipelines.review.exchange import import_verdicts
        from pipelines.review.ledger import append_verdicts

        vs = import_verdicts(args.file, args.format)
        append_verdicts(Lake(default_lake_root()), vs)
        print(f"imported {len(vs)} verdicts into the ledger")


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ap = argparse.ArgumentParser(prog="synpref")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the whole pipeline on the embedded default")
    d.add_argument("--scale", choices=["tiny", "small", "medium"], default="small")
    r = sub.add_parser("review", help="the human review app")
    rs = r.add_subparsers(dest="review_cmd", required=True)
    a = rs.add_parser("add-annotator")
    a.add_argument("name")
    a.add_argument("--lead", action="store_true")
    s = rs.add_parser("serve")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    for name in ("export", "import"):
        e = rs.add_parser(name)
        e.add_argument("file")
        e.add_argument("--format", default="jsonl", choices=["jsonl", "csv", "labelstudio"])
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        demo(args.scale)
    else:
        review(args)


if __name__ == "__main__":
    sys.exit(main())
