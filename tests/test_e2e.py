"""The README's first command, end to end, at the smallest scale, on a temporary data directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_every_asset_end_to_end(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "SYNPREF_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    env.pop("MLFLOW_TRACKING_URI", None)
    synpref = Path(sys.executable).parent / "synpref"
    out = subprocess.run([str(synpref), "demo", "--scale", "tiny"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Where to look" in out.stdout and "| rm_version |" in out.stdout
    assert "Stage 2 on" in out.stdout and "(known truth): label precision" in out.stdout
    # the whole pipeline was one run of main_job, which ingested every synthetic shard as a partition
    import dagster as dg

    from pipelines.synth.generator import synthetic_shard_keys

    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    runs = instance.get_runs()
    assert [r.job_name for r in runs] == ["main_job"] and runs[0].status == dg.DagsterRunStatus.SUCCESS
    assert instance.get_materialized_partitions(dg.AssetKey("raw_pairs")) == set(synthetic_shard_keys(2))
    done = {k.to_user_string() for k in instance.get_asset_keys()}
    assert {"rm_family/minilm", "rm_family/tiny_qwen3", "rm_evaluation", "curated_pairs"} <= done

    from pipelines.lake import Lake

    lake = Lake(str(home / "lake"))
    for t in ("raw_pairs", "quarantine", "duplicates", "llm_annotations", "llm_judgments", "pair_embeddings",
              "review_queue", "human_verdicts", "human_verified_seed", "silver_pairs", "stage1_metrics",
              "rm_registry", "rm_scores", "curated_pairs", "recycled_pairs", "rm_evaluation", "lineage"):
        assert lake.exists(t), t
    # every ingest reconciles; nothing silently lost
    lin = lake.lineage("raw_pairs")
    for c in lin["counts"].to_list():
        c = json.loads(c)
        assert c["candidates"] == c["kept"] + c["already_present"] + c["duplicates"] + c["quarantined"]
    # the ensemble judged the seed pool (both orders shown), then Stage 1 and Stage 2 added their own judgments
    j = lake.read("llm_judgments")
    assert {"seed", "stage2"} <= set(j["context"]) and any(c.startswith("stage1-it") for c in j["context"])
    assert set(j["order_shown"]) == {"chosen_first", "rejected_first"}
    # curated rows say why they were kept and which models decided
    cur = lake.read("curated_pairs")
    s2 = cur.filter(pl.col("stage") == "stage2")
    assert s2.height > 0 and s2["best_rm_version"].is_not_null().all() and s2["gold_rm_version"].is_not_null().all()
    assert set(cur["why"].str.split(" ").list.first()) <= {"confident", "unconfident", "stage1:"}
    # the simulated pipeline curates cleaner data than it was given (known ground truth)
    truth = dict(lake.read("synth_truth").select("pair_id", "label_correct").iter_rows())
    raw_precision = sum(truth.get(p, True) for p in lake.read("raw_pairs")["pair_id"]) / lake.read("raw_pairs").height
    kept_precision = sum(truth.get(p, True) for p in s2["pair_id"]) / s2.height
    assert kept_precision > raw_precision + 0.05, (kept_precision, raw_precision)
    # the evaluation has every model on every benchmark, better than chance
    ev = lake.read("rm_evaluation").filter(pl.col("section") == "overall")
    assert set(ev["benchmark"]) == {"synth-bench", "gold-slice"}
    assert ev.filter(pl.col("rm_version").str.starts_with("synpref-rm-minilm"))["accuracy"].min() > 0.6
    assert (home / "reports" / "rm_evaluation.md").exists() and (home / "reports" / "rm_evaluation.png").exists()
    # models are registered in MLflow and load back as HF folders
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{home}/mlflow/mlflow.db")
    names = {m.name for m in MlflowClient().search_registered_models()}
    assert {"synpref-gold-rm", "synpref-stage1-rm", "synpref-rm-minilm", "synpref-rm-tiny-qwen3"} <= names
