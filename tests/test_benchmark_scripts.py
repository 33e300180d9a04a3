"""The GPU benchmark must not rot while no GPU is lent: its CPU smoke run trains every layout and reports them."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


SMOKE = ["--shape", "tiny", "--pairs", "24", "--max-len", "256", "--steps", "3", "--batch", "8", "--history-words", "20",
         "--response-words", "10", "--layouts", "pairs,shared_prefix,packed"]


def test_rm_gpu_benchmark_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "benchmarks/rm_gpu.py", *SMOKE, "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert [x["layout"] for x in res] == ["trl-style batches", "pairs, length-grouped", "shared_prefix",
                                          "packed (varlen)"]
    assert all(x["tokens_per_s_per_gpu"] > 0 and x["steps"] == 3 and x["final_loss"] > 0 for x in res)
    assert "vs TRL-style" in r.stdout


def test_rm_gpu_benchmark_under_torchrun_reports_per_gpu_figures(tmp_path):
    """Two gloo ranks on CPU stand in for two GPUs: the global batch is split, each rank reports its own tokens/s."""
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "benchmarks/rm_gpu.py", *SMOKE, "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert len(res) == 4 and "x2 (FSDP2)" in r.stdout
    # the total counts both ranks' tokens, the per-GPU figure one rank's: a balanced split gives about half
    assert all(0.25 < x["tokens_per_s_per_gpu"] / x["tokens_per_s_total"] < 0.75 for x in res)


def test_rm_library_loads_with_torch_and_transformers_only():
    """GPU images carry torch + transformers but not polars/deltalake/mlflow/dagster: the trainer and the GPU
    benchmark must import there."""
    code = ("import builtins, sys\n"
            "real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name.split('.')[0] in ('polars', 'deltalake', 'mlflow', 'dagster'):\n"
            "        raise ImportError('not on a GPU image: ' + name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "sys.path.insert(0, 'benchmarks')\n"
            "import rm_gpu\n"
            "from pipelines.rm import data, losses, model, tiny, train\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
