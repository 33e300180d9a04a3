"""`synpref` command line: the end-to-end demo on the embedded default, and the review app.

    synpref demo [--scale tiny|small|medium] [--verbose]   # everything, on project-made data, CPU, local
    synpref benchmarks add PATH [--name NAME] [--as FILENAME] | fetch NAME [--revision REV] | list
    synpref train-rm --pairs PATH --backbone DIR --out DIR [--val PATH] [--nproc N] [--max-steps N] [--set k=v ...]
    synpref evaluate --model DIR|models:/NAME/VERSION|HUB_ID [--name NAME] [--benchmarks A,B] [--max-len N]
                     [--out DIR]
    synpref serve --model DIR|models:/NAME/VERSION|HUB_ID [--port P] [--max-batch N] [--max-queue Q] [--api-key-env V]
    synpref review add-annotator NAME [--lead]
    synpref review serve [--port 8000] [--lease-ttl 600]
    synpref review compact
    synpref review export FILE [--format jsonl|csv|labelstudio]
    synpref review import FILE [--format jsonl|csv|labelstudio]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

from pipelines.settings import default_lake_root, default_mlflow_uri, home

# Each command imports what it runs inside its own function: `synpref --help` and the light commands load neither
# Dagster nor torch at start-up.


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


def demo(scale: str = "small", verbose: bool = False, engine: str = "ray") -> dict:
    """Run `main_job` once over every synthetic shard: the whole pipeline is one Dagster run. By default one line
    per finished step; `verbose` streams Dagster's event log and the libraries' own output."""
    from jobs.progress import StepPrinter, quiet_libraries

    if not verbose:
        quiet_libraries()
    from assets.family import CPU_MEMBERS, family_key
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
        **{family_key(b).to_python_identifier(): {"config": {"epochs": cfg["family_epochs"]}} for b in CPU_MEMBERS},
    }
    # the demo's data is project-made, so its judge is the simulated one, chosen here explicitly (a deployment's
    # Definitions have no LLM unless SYNPREF_LLM_BACKEND sets one); this run config replaces any env-set LLM
    run_config = {"ops": ops, "resources": {"compute": {"config": {"engine": engine}},
                                            "llm": {"config": {"backend": "simulated"}}}}
    if not verbose:  # the event log is still stored in full in the run; only the console stream is quiet
        run_config["loggers"] = {"console": {"config": {"log_level": "ERROR"}}}
    tags = {"dagster/asset_partition_range_start": shards[0], "dagster/asset_partition_range_end": shards[-1]}
    run_id = str(uuid.uuid4())  # known before the run starts, so its event log can be followed
    print(f"[synpref] main_job run {run_id}: one line per step below (the full event log is in the run)",
          flush=True)
    printer = StepPrinter(instance, run_id, t0) if not verbose else None
    if printer:
        printer.__enter__()
    try:
        result = defs.get_job_def("main_job").execute_in_process(instance=instance, run_config=run_config, tags=tags,
                                                                 run_id=run_id, raise_on_error=False)
    finally:
        if printer:
            printer.__exit__(None, None, None)
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
              f"{meta['pool_label_precision']:.3f} -> {meta['kept_label_precision']:.3f} in the {meta['curated']} "
              f"kept; wrong labels found: recall {meta['flip_detection_recall']:.3f}, precision "
              f"{meta['flip_detection_precision']:.3f} ({meta['recycled']} flipped into recycled_pairs); "
              f"{100 * meta['skipped_annotation_share']:.0f}% of the pool needed no LLM call", flush=True)
    print(f"[synpref] finished in {summary['seconds']}s. Where to look:\n"
          f"  Dagster UI : make ui   (DAGSTER_HOME={os.environ['DAGSTER_HOME']}) -> http://127.0.0.1:3000\n"
          f"  MLflow UI  : .venv/bin/mlflow ui --backend-store-uri {default_mlflow_uri()}\n"
          f"  Report     : {report} (+ rm_evaluation.png)\n"
          f"  Lake       : {lake.root} (Delta tables; lineage in {lake.root}/lineage)", flush=True)
    return summary


def benchmarks_cmd(args: argparse.Namespace) -> None:
    from pipelines.evaluate.benchmarks import (BenchmarkFormatError, add_benchmark, expected_layouts,
                                               fetch_benchmark)

    root = home() / "benchmarks"
    try:
        if args.bench_cmd == "add":
            dst = add_benchmark(Path(args.path), root, args.name, as_name=getattr(args, "as_name", None))
            print(f"added {args.path} as {dst.parent.name}: {dst}")
        elif args.bench_cmd == "fetch":
            for dst in fetch_benchmark(args.name, root, args.revision):
                print(f"fetched {args.name}: {dst}")
        else:
            print(f"benchmarks under {root}: {sorted(p.name for p in root.iterdir()) if root.exists() else []}\n"
                  f"layouts:\n{expected_layouts()}")
    except BenchmarkFormatError as e:
        raise SystemExit(f"refused: {e}") from None


def evaluate_cmd(args: argparse.Namespace) -> None:
    """Any RM on every added benchmark, next to the project's own RMs (same tables, same report)."""
    from jobs.progress import quiet_libraries

    quiet_libraries()
    from assets.meta import md_table, plt
    from pipelines.compute import InProcessEngine
    from pipelines.evaluate.benchmarks import BenchmarkFormatError
    from pipelines.evaluate.run import evaluate_external, evaluation_so_far, table1_text, write_report
    from pipelines.lake import Lake

    lake = Lake(default_lake_root())
    folder = Path(args.benchmarks_dir) if args.benchmarks_dir else home() / "benchmarks"
    engine = InProcessEngine(max_len=args.max_len)
    picked = getattr(args, "benchmarks", None)
    only = [b.strip() for b in picked.split(",") if b.strip()] if picked else None
    try:
        ev, rm_version = evaluate_external(lake, args.model, engine, only=only,
                                           name=args.name, benchmarks_dir=folder,
                                           tracking_uri=args.mlflow_uri or default_mlflow_uri(),
                                           cache_root=home() / "model_cache", max_len_cap=args.max_len,
                                           run_id=f"cli-{uuid.uuid4().hex[:12]}")
    except BenchmarkFormatError as e:
        raise SystemExit(f"refused: {e}") from None
    report = write_report(evaluation_so_far(lake, ev), home() / "reports", md_table, plt)
    overall = ev.results.filter(ev.results["section"] == "overall").select("benchmark", "score", "n", "truncated")
    print(f"{rm_version} (engine: {engine.describe()}, max_len <= {args.max_len}):")
    for b, score, n, cut in overall.iter_rows():
        print(f"  {b:16s} {score:.4f}  ({n} items, {cut} with a text cut)")
    print(table1_text(evaluation_so_far(lake, ev), md_table))
    print(f"report: {report} (its training data is unknown here: the leak check does not cover it)")
    if args.out:
        from pipelines.evaluate.run import write_authors_formats

        for f in write_authors_formats(ev, rm_version, Path(args.out)):
            print(f"wrote {f}")


def served_name(model: str) -> str:
    """The name a served model answers to when --name is not given: a registered model's NAME (not its version),
    else the folder's or hub id's last part."""
    if model.startswith("models:/"):
        return model.removeprefix("models:/").split("/")[0]
    return model.rstrip("/").split("/")[-1]


def serve_cmd(args: argparse.Namespace) -> None:
    """The reward server (pipelines/serve/reward_server.py) on one model until SIGTERM/Ctrl-C."""
    import os

    import uvicorn

    from jobs.progress import quiet_libraries
    from pipelines.serve.reward_server import FORWARD_OVERHEAD_TOKENS, ServeConfig, build_server

    quiet_libraries()
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not key:
        raise SystemExit(f"refused: --api-key-env {args.api_key_env} is set but the variable is empty")
    cfg = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                      max_len=args.max_len, batch_tokens=args.batch_tokens,
                      forward_overhead_tokens=(FORWARD_OVERHEAD_TOKENS if args.forward_overhead_tokens is None
                                               else args.forward_overhead_tokens), api_key=key,
                      name=args.name or served_name(args.model), max_rows=args.max_rows,
                      max_chars=args.max_chars, max_tokens=args.max_tokens, strip_padding=args.strip_padding,
                      encode_threads=args.encode_threads)
    app, scorer = build_server(args.model, cfg, tracking_uri=args.mlflow_uri or default_mlflow_uri(),
                               cache_root=str(home() / "model_cache"))
    print(f"serving {cfg.name} on http://{args.host}:{args.port} (max_len {scorer.max_len}, calibration: "
          f"{scorer.calibration.source}, batches of <= {cfg.max_batch} within {cfg.max_wait_ms} ms, queue "
          f"{cfg.max_queue}{', bearer token required' if key else ''}; per request <= {cfg.max_rows} texts of <= "
          f"{cfg.max_chars} chars / {cfg.max_tokens} tokens; pad/EOS stripping on /get_reward "
          f"{'on' if cfg.strip_padding else 'off'})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def train_rm(args: argparse.Namespace) -> None:
    from pipelines.rm.byo import PAPER_DEFAULTS, parse_settings, train_on_pairs

    try:
        settings = parse_settings(args.set or [])
    except ValueError as e:
        raise SystemExit(f"train-rm: {e}") from None
    given = ", ".join(f"{k}={v}" for k, v in PAPER_DEFAULTS.items() if k not in settings)
    print(f"[train-rm] the paper's final-run settings where you gave none: {given}", flush=True)
    from pipelines.rm.memory import MemoryPlanError

    try:
        out = train_on_pairs(args.pairs, args.backbone, args.out, val=args.val, nproc=args.nproc,
                             max_steps=args.max_steps, settings=settings, store_root=args.store_root,
                             tracking_uri=args.mlflow_uri or default_mlflow_uri(), run_name=args.name,
                             register=args.register, build=args.build, say=lambda m: print(m, flush=True))
    except MemoryPlanError as e:  # refused before training: say which setting to change (--set key=value)
        raise SystemExit(f"train-rm: {e}") from None
    r = out.result
    sel = f"gold accuracy {r.best_val_accuracy:.3f}" if r.best_val_accuracy >= 0 else "no validation set"
    print(f"[train-rm] {r.steps} steps on {r.pairs} pairs x {r.world_size} rank(s) ({r.tokens_per_s:,.0f} tokens/s; "
          f"resumed from step {r.resumed_from_step}); {sel}\n"
          f"[train-rm] model: {r.best_dir} (AutoModelForSequenceClassification, num_labels=1); MLflow run "
          f"{out.mlflow_run_id}{'; registered ' + out.registered if out.registered else ''}", flush=True)


def review(args: argparse.Namespace) -> None:
    from pipelines.lake import Lake
    from pipelines.review.app import add_annotator, create_app

    annotators = home() / "review" / "annotators.json"
    if args.review_cmd == "add-annotator":
        token = add_annotator(annotators, args.name, "lead" if args.lead else "annotator")
        print(f"token for {args.name} (shown once, stored hashed): {token}")
    elif args.review_cmd == "serve":
        import uvicorn

        uvicorn.run(create_app(default_lake_root(), annotators, lease_ttl_s=args.lease_ttl,
                               sync_every_s=args.sync_every), host=args.host, port=args.port)
    elif args.review_cmd == "compact":
        from pipelines.review.ledger import compact_ledger

        c = compact_ledger(Lake(default_lake_root()))
        print(f"ledger files: {c['files_before']} -> {c['files_after']}")
    elif args.review_cmd == "export":
        import polars as pl

        from pipelines.annotate.attributes import attributes
        from pipelines.review.exchange import export_tasks
        from pipelines.review.queue import QUEUE
        from pipelines.tables import RAW

        lake = Lake(default_lake_root())
        q = lake.read(QUEUE)
        q = q.filter(pl.col("queue_version") == q["queue_version"].max())
        # the texts come from raw_pairs (queues written before review_queue carried them have empty text columns)
        items = q.drop("history", "chosen", "rejected", strict=False).join(
            lake.scan(RAW).join(q.select("pair_id").lazy(), on="pair_id", how="semi").collect(), on="pair_id")
        items = items.join(attributes(lake, q).select("pair_id", "guideline").collect(), on="pair_id", how="left")
        print(f"exported {export_tasks(items, args.file, args.format)} tasks to {args.file}")
    elif args.review_cmd == "import":
        from pipelines.review.exchange import import_verdicts
        from pipelines.review.ledger import append_verdicts

        vs = import_verdicts(args.file, args.format)
        append_verdicts(Lake(default_lake_root()), vs)
        print(f"imported {len(vs)} verdicts into the ledger")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that never accepts an abbreviated option (`add_subparsers` makes its subparsers of the
    same class, so every subcommand's parser refuses them too)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The `synpref` parser and its subcommands."""
    # allow_abbrev=False on every parser (subparsers are made of the parent's class): `--benchmarks` must never be
    # read as an abbreviation of `--benchmarks-dir`, nor any other prefix as a flag it happens to start
    ap = _Parser(prog="synpref")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _demo_args(sub)
    _benchmarks_args(sub)
    _train_rm_args(sub)
    _evaluate_args(sub)
    _serve_args(sub)
    _review_args(sub)
    return ap


def _demo_args(sub) -> None:
    d = sub.add_parser("demo", help="run the whole pipeline on the embedded default")
    d.add_argument("--scale", choices=["tiny", "small", "medium"], default="small")
    d.add_argument("--verbose", action="store_true", help="stream Dagster's event log and the libraries' output")
    d.add_argument("--engine", choices=["ray", "inprocess"], default="ray",
                   help="where RM scoring and embedding run: a local Ray (default) or this process")


def _benchmarks_args(sub) -> None:
    b = sub.add_parser("benchmarks", help="put published benchmark files where rm_evaluation finds them")
    bs = b.add_subparsers(dest="bench_cmd", required=True)
    ba = bs.add_parser("add", help="copy a published benchmark file (its layout is checked)")
    ba.add_argument("path")
    ba.add_argument("--name", default=None, help="benchmark name (default: recognised from the file's layout)")
    ba.add_argument("--as", dest="as_name", default=None, metavar="FILENAME",
                    help="store the file under this name (a file of the same name is never overwritten)")
    bf = bs.add_parser("fetch", help="download a benchmark from the Hugging Face Hub (its published files)")
    bf.add_argument("name")
    bf.add_argument("--revision", default=None)
    bs.add_parser("list", help="the benchmarks present and the layouts SynPref reads")


def _train_rm_args(sub) -> None:
    t = sub.add_parser("train-rm", help="train a reward model on your own pairs (token store + trainer + MLflow)")
    t.add_argument("--pairs", required=True, help="Parquet file or folder, or a Delta table; local or s3://")
    t.add_argument("--backbone", required=True, help="model folder or hub id (offline: from the local cache)")
    t.add_argument("--out", required=True, help="output folder (the model is <out>/best; a rerun resumes)")
    t.add_argument("--val", default=None, help="selection pairs (same layouts): the checkpoint with the best accuracy")
    t.add_argument("--nproc", type=int, default=1, help="ranks on this node (torchrun when > 1)")
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="any TrainConfig field, e.g. --set lr=1e-5")
    t.add_argument("--store-root", default=None, help="where token stores go (default <out>/token_store)")
    t.add_argument("--build", choices=["auto", "ray", "inprocess"], default="auto",
                   help="where to tokenize the pairs into the token store. auto: on Ray when a cluster is at hand "
                        "(SYNPREF_RAY_ADDRESS names one: auto, ray://head:10001, or local for a fresh local Ray; "
                        "or this process is already connected) and the input is large (more than one build task, "
                        "i.e. over 50,000 rows), else here; ray: always on Ray (SYNPREF_RAY_ADDRESS, else a local "
                        "Ray); inprocess: here")
    t.add_argument("--mlflow-uri", default=None, help="tracking URI (default: the SynPref home's SQLite store)")
    t.add_argument("--name", default="train-rm", help="MLflow run name")
    t.add_argument("--register", default=None, help="register the model under this MLflow name")


def _evaluate_args(sub) -> None:
    ev = sub.add_parser("evaluate", help="score any reward model on every added benchmark, next to the project's")
    ev.add_argument("--model", required=True, help="HF folder, models:/NAME/VERSION, or a hub id (local cache)")
    ev.add_argument("--name", default=None, help="label in the tables (rm_version external:<name>; default: the "
                                                  "folder's name, with its parents when another model has it)")
    ev.add_argument("--max-len", type=int, default=4096, help="cap on the model's own context")
    ev.add_argument("--benchmarks-dir", default=None, help="default <SYNPREF_HOME>/benchmarks")
    ev.add_argument("--benchmarks", default=None, metavar="A,B",
                    help="score these benchmarks only (comma-separated folder names, gold_test too; default: all)")
    ev.add_argument("--mlflow-uri", default=None, help="for models:/ URIs (default: the SynPref home's store)")
    ev.add_argument("--out", default=None, help="also write summary.json and per-item files in the authors' formats")


def _serve_args(sub) -> None:
    sv = sub.add_parser("serve", help="serve a reward model over HTTP (OpenRLHF /get_reward, vLLM /classify, "
                                      "/v1/reward)")
    sv.add_argument("--model", required=True, help="HF folder, models:/NAME/VERSION, or a hub id (local cache)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8001)
    sv.add_argument("--name", default=None, help="the model id the API reports (default: the folder's name)")
    sv.add_argument("--max-len", type=int, default=4096, help="cap on the model's own context")
    sv.add_argument("--max-batch", type=int, default=32, help="sequences per forward")
    sv.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    sv.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens a forward may hold")
    sv.add_argument("--forward-overhead-tokens", type=int, default=None,
                    help="what one more forward costs in padded tokens, when a batch is cut into forwards (default: "
                         "reward_server.FORWARD_OVERHEAD_TOKENS, measured on CPU; raise it on GPUs, where a forward's "
                         "fixed cost is larger)")
    sv.add_argument("--max-queue", type=int, default=1024, help="sequences accepted and unanswered before 429")
    sv.add_argument("--max-rows", type=int, default=512, help="texts one request may hold (413 past it)")
    sv.add_argument("--max-chars", type=int, default=200_000,
                    help="characters per text, checked before tokenizing (413 past it)")
    sv.add_argument("--max-tokens", type=int, default=65_536,
                    help="tokens per text before it is cut to --max-len (413 past it)")
    sv.add_argument("--strip-padding", action=argparse.BooleanOptionalAction, default=True,
                    help="/get_reward: strip the pad/EOS tokens around each query, as OpenRLHF's serve_rm does")
    sv.add_argument("--encode-threads", type=int, default=2, help="threads that render and tokenize requests")
    sv.add_argument("--api-key-env", default=None, help="env var holding a bearer token clients must send")
    sv.add_argument("--mlflow-uri", default=None, help="for models:/ URIs (default: the SynPref home's store)")


def _review_args(sub) -> None:
    r = sub.add_parser("review", help="the human review app")
    rs = r.add_subparsers(dest="review_cmd", required=True)
    a = rs.add_parser("add-annotator")
    a.add_argument("name")
    a.add_argument("--lead", action="store_true")
    s = rs.add_parser("serve")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--lease-ttl", type=float, default=600.0,
                   help="seconds an item stays with an annotator whose page stopped answering (a closed tab)")
    s.add_argument("--sync-every", type=float, default=2.0,
                   help="seconds between picking up verdicts and batches written elsewhere")
    rs.add_parser("compact", help="rewrite the verdict ledger's small files into one (the app also does it)")
    for name in ("export", "import"):
        e = rs.add_parser(name)
        e.add_argument("file")
        e.add_argument("--format", default="jsonl", choices=["jsonl", "csv", "labelstudio"])


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if args.cmd == "demo":
        demo(args.scale, args.verbose, args.engine)
    elif args.cmd == "benchmarks":
        benchmarks_cmd(args)
    elif args.cmd == "train-rm":
        train_rm(args)
    elif args.cmd == "evaluate":
        evaluate_cmd(args)
    elif args.cmd == "serve":
        serve_cmd(args)
    else:
        review(args)


if __name__ == "__main__":
    sys.exit(main())
