"""The judge gates as blocking asset checks: a judge that always answers "Candidate 1" (position bias) or that
disagrees with the humans is stopped before Stage 1 runs on its labels; a judge that can judge passes."""

import dagster as dg
import polars as pl
import pyarrow as pa
import pytest

from pipelines.lake import Lake
from pipelines.review.seed import gold_split
from pipelines.tables import SEED, SYNTH_TRUTH
from tests.rm_helpers import synth_rows


@pytest.fixture
def seeded(synpref_home):
    rows = synth_rows(80, seed=31)[:60]
    lake = Lake(str(synpref_home / "lake"))
    lake.overwrite(SEED, pl.DataFrame([{**{k: r[k] for k in ("pair_id", "history", "chosen", "rejected")},
                                        "label_origin": "simulated", "label_flipped": False,
                                        "task_category": r["category"], "guideline": "be right",
                                        "split": gold_split(r["pair_id"], 0.2, 0.2)} for r in rows]).to_arrow())
    lake.overwrite(SYNTH_TRUTH, pa.Table.from_pylist([{"pair_id": r["pair_id"], "label_correct": True,
                                                       "category": r["category"]} for r in rows]))
    return lake


def _run(llm):
    from assets.curate import llm_judgments, stage1
    from definitions import defs

    with dg.instance_for_test() as inst:
        res = dg.materialize([llm_judgments, stage1], instance=inst, resources={**defs.resources, "llm": llm},
                             raise_on_error=False)
    checks = {c.check_name: c for c in res.get_asset_check_evaluations()}
    ran_stage1 = any(e.step_key == "stage1" and e.is_step_success for e in res.all_events)
    (judged,) = [m for m in res.get_asset_materialization_events() if m.step_key == "llm_judgments"]
    meta = {k: v.value for k, v in judged.materialization.metadata.items()}
    # what the seed's judging cost is in its metadata, and it counts the rows it wrote
    assert meta["llm_requests"] == meta["samples"] > 0 and meta["llm_tokens_in"] > 0
    assert meta["llm_cost_usd"] == 0 and "(unpriced)" in meta["llm_usage"]
    return checks, ran_stage1


@pytest.mark.parametrize("accuracy,bias,gate", [(0.0, 1.0, "position_bias"), (0.95, 0.5, "human_agreement")])
def test_a_judge_that_cannot_judge_is_stopped_before_stage1(seeded, accuracy, bias, gate):
    from resources.llm import LLMResource

    if gate == "human_agreement":  # a judge that follows another truth than the humans': it contradicts them
        truth = seeded.read(SYNTH_TRUTH).with_columns(label_correct=pl.lit(False))
        seeded.overwrite(SYNTH_TRUTH, truth.to_arrow())

    llm = LLMResource(backend="simulated", models=["sim-a"], simulated_accuracy=accuracy, simulated_position_bias=bias, samples=3)
    checks, ran = _run(llm)
    assert checks[gate].passed is False and not ran
    if gate == "position_bias":
        assert checks[gate].metadata["share_candidate_1"].value == 1.0
    else:
        assert checks[gate].metadata["agreement"].value < 0.2 and checks["position_bias"].passed


def test_gates_compute_on_the_stored_samples(seeded):
    from pipelines.annotate.judging import aggregate_judgments
    from pipelines.curate.stage1 import as_stored
    from pipelines.evaluate.gates import judge_gates

    lake = seeded
    samples = pl.DataFrame({"pair_id": ["a", "a", "b", "b", "c"], "model": ["m"] * 5, "status": ["ok"] * 5,
                            "order_shown": ["chosen_first", "rejected_first", "chosen_first", "rejected_first",
                                            "chosen_first"],
                            "verdict_raw": ["1", "1", "1", "2", "1"],
                            "prefers": ["chosen", "rejected", "chosen", "chosen", "chosen"]})
    seed = pl.DataFrame({"pair_id": ["a", "b", "c"], "label_flipped": [False, False, True]})
    g = judge_gates(samples, aggregate_judgments(samples), seed)
    assert g.balanced_pairs == 2 and g.share_candidate_1 == pytest.approx(3 / 4)  # c saw one order only
    # a: 1 chosen 1 rejected -> undecidable; b: chosen (human chosen) right; c: chosen but humans flipped -> wrong
    assert g.decided_pairs == 2 and g.agreement == pytest.approx(0.5)
    assert not g.position_ok(0.35, 0.65) and as_stored(lake.read(SEED)).height == 60
