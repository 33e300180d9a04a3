"""Stage 1 as one function (pipelines/curate/stage1.py) on a real lake, with a stand-in RM trainer (the loop is
under test, not the RM) and the simulated judges: an iteration grows silver from error-driven retrieval, never
touches gold_val/gold_test, and a rerun or a crash mid-iteration continues without duplicating anything."""

import hashlib
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from pipelines.annotate.backends import SimulatedBackend
from pipelines.annotate.prompts import load_prompt
from pipelines.annotate.attributes import attributes
from pipelines.curate.judge import JudgeSetup, exemplar_index, judge_with_exemplars
from pipelines.curate.prepare import annotate_pool, embed_pool
from pipelines.curate.stage1 import Stage1Config, as_stored, run_stage1
from pipelines.ingest.run import ingest_shard
from pipelines.lake import Lake
from pipelines.pool import pool_stage_expr, truth_categories
from pipelines.review.seed import gold_split
from pipelines.synth.generator import write_shard
from pipelines.tables import JUDGMENTS, SEED, SILVER, STAGE1_JUDGMENTS, STAGE1_METRICS, SYNTH_TRUTH

FRACTION = 0.5
ROOT = Path(__file__).resolve().parents[1]


def fake_encode(texts: list[str]) -> np.ndarray:
    """A deterministic stand-in embedding (unit vectors from a hash of the text): retrieval's mechanics are under
    test here, not its quality."""
    # a digest, not hash(): Python salts str hashes per process, so runs would differ
    seeds = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little") for t in texts]
    out = np.stack([np.random.default_rng(s).normal(size=16) for s in seeds]).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


class StandInRMs:
    """The RewardModels protocol without a network: records what it trained and selected on; p from the id."""

    def __init__(self, fail_scoring_at: int | None = None):
        self.calls: list[tuple[set, set]] = []
        self.fail_scoring_at = fail_scoring_at
        self.scored = 0

    def train(self, *, name, role, train, val, extra):
        self.calls.append((set(train["pair_id"]), set(val["pair_id"])))
        return SimpleNamespace(rm_version=f"stand-in:{len(self.calls)}", val_accuracy=0.5 + 0.01 * len(self.calls))

    def score(self, rm_version, pairs):
        self.scored += 1
        if self.fail_scoring_at == self.scored:
            raise RuntimeError("the scoring node went away")
        return pairs.select("pair_id", p=(pl.col("pair_id").str.slice(8, 4).str.to_integer(base=16) / 65535.0))


def judging_setup() -> JudgeSetup:
    return JudgeSetup(judges=[SimulatedBackend(name="j1", accuracy=0.9), SimulatedBackend(name="j2")],
                      prompt=load_prompt("judge_v1"), samples=2)


@pytest.fixture
def stage1_lake(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    f = tmp_path / "shard.jsonl"
    lake.overwrite(SYNTH_TRUTH, pa.Table.from_pylist(write_shard(f, 500, seed=5, label_noise=0.25)))
    ingest_shard(lake, str(f), source="synth", shard="synth/s", run_id="i")
    annotate_pool(lake, SimulatedBackend(), load_prompt("attributes_v1"), "a", stage1_fraction=FRACTION,
                  categories=lambda p: truth_categories(lake, p))
    embed_pool(lake, fake_encode, "fake", stage1_fraction=FRACTION)
    pool = lake.scan("raw_pairs").filter(pool_stage_expr(FRACTION) == "stage1").head(90).collect()
    attrs = attributes(lake, pool).collect()
    seed = pool.select("pair_id", "history", "chosen", "rejected").join(attrs, on="pair_id").with_columns(
        label_origin=pl.lit("simulated"), label_flipped=pl.lit(False),
        split=pl.col("pair_id").map_elements(lambda p: gold_split(p, 0.25, 0.25), return_dtype=pl.String))
    lake.overwrite(SEED, seed.to_arrow())
    judging = judging_setup()
    judge_with_exemplars(lake, as_stored(seed), judging, exemplar_index(lake, seed.filter(pl.col("split") != "gold_test")),
                         run_id="seed", context="seed", table=JUDGMENTS)
    return lake, judging, seed


def test_an_iteration_grows_silver_from_retrieval_and_never_touches_held_out_pairs(stage1_lake):
    lake, judging, seed = stage1_lake
    held = set(seed.filter(pl.col("split") != "train")["pair_id"])
    test_ids = set(seed.filter(pl.col("split") == "gold_test")["pair_id"])
    val_ids = set(seed.filter(pl.col("split") == "gold_val")["pair_id"])
    rms = StandInRMs()
    cfg = Stage1Config(iterations=1, stage1_fraction=FRACTION, label_origin="simulated")
    res = run_stage1(lake, cfg, rms, judging, run_id="r1")
    silver = lake.read(SILVER)
    m = lake.read(STAGE1_METRICS)
    assert res.iterations_run == 1 and m["iteration"].to_list() == [1]
    boot, added = silver.filter(pl.col("iteration") == 0), silver.filter(pl.col("iteration") == 1)
    assert boot.height > 0 and set(boot["pair_id"]) <= set(seed.filter(pl.col("split") == "train")["pair_id"])
    assert added.height == m["added"][0] > 0 and m["retrieved"][0] >= m["judged"][0] >= added.height
    assert not set(silver["pair_id"]) & held  # silver never holds a gold_val or gold_test pair in any form
    (trained, selected), = rms.calls
    assert trained == set(boot["pair_id"]) and selected == val_ids and not trained & test_ids
    judged = set(lake.read(STAGE1_JUDGMENTS)["pair_id"])
    assert set(added["pair_id"]) <= judged and len(judged) == m["judged"][0]  # silver = the decisive verdicts
    assert not judged & set(seed["pair_id"])  # retrieval searched the unverified pool, not the seed
    # retrieval is error-driven: the gold_val pairs the RM got wrong asked for k_max neighbours each
    wrong = m["gold_val_wrong"][0]
    assert m["retrieved"][0] >= wrong * cfg.k_max


def test_rerun_continues_and_a_crash_mid_iteration_duplicates_nothing(stage1_lake):
    lake, judging, _ = stage1_lake
    cfg = Stage1Config(iterations=1, stage1_fraction=FRACTION, label_origin="simulated")
    run_stage1(lake, cfg, StandInRMs(), judging, run_id="r1")
    # iteration 2 crashes after training, before its silver rows are written
    with pytest.raises(RuntimeError, match="went away"):
        run_stage1(lake, cfg, StandInRMs(fail_scoring_at=1), judging, run_id="r2")
    assert lake.read(STAGE1_METRICS)["iteration"].to_list() == [1]
    rms = StandInRMs()
    res = run_stage1(lake, cfg, rms, judging, run_id="r3")
    m = lake.read(STAGE1_METRICS).sort("iteration")
    assert res.iterations_run == 1 and m["iteration"].to_list() == [1, 2]
    silver = lake.read(SILVER)
    assert silver["pair_id"].n_unique() == silver.height  # nothing twice
    (trained, _), = rms.calls  # iteration 2 trained on everything silver held after iteration 1
    assert trained == set(silver.filter(pl.col("iteration") < 2)["pair_id"])


@pytest.mark.slow
def test_a_kill_after_judging_does_not_change_what_the_rerun_retrieves(stage1_lake, tmp_path):
    """kill -9 between an iteration's verdicts (cached) and its silver commit: the rerun retrieves and judges the
    same pairs as an uninterrupted run, and silver ends up identical (the crashed attempt's verdicts are not
    'used' pairs)."""
    lake, judging, _ = stage1_lake
    twin = tmp_path / "twin"
    shutil.copytree(lake.root, twin)
    cfg = Stage1Config(iterations=1, stage1_fraction=FRACTION, label_origin="simulated")
    killed = subprocess.run([sys.executable, "-m", "tests.stage1_kill", lake.root], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert lake.exists(STAGE1_JUDGMENTS) and lake.read(STAGE1_JUDGMENTS).height > 0  # verdicts were cached
    assert not lake.exists(STAGE1_METRICS) and set(lake.read(SILVER)["iteration"]) == {0}
    run_stage1(lake, cfg, StandInRMs(), judging, run_id="rerun")
    uninterrupted = Lake(str(twin))
    run_stage1(uninterrupted, cfg, StandInRMs(), judging, run_id="rerun")
    cols = ["iteration", "retrieved", "judged", "added", "silver_size"]
    assert lake.read(STAGE1_METRICS).select(cols).equals(uninterrupted.read(STAGE1_METRICS).select(cols))
    got, want = (t.read(SILVER).drop("run_id", strict=False).sort("pair_id") for t in (lake, uninterrupted))
    assert got.height > want.filter(pl.col("iteration") == 0).height and got.equals(want)
