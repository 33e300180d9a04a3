"""Data-parallel RM training under torchrun from a token store: 2 CPU processes over gloo, a tiny random Qwen3.

What must hold (none of it timed): the ranks together see every training pair exactly once per epoch; 2 ranks
give the weights 1 process gives on the same global batches, under plain SGD without clipping (Adam and clipping
would hide a wrong loss scale); each rank's model is built on the meta device and loaded shard by shard, equal to
the plain HF load; a run killed with SIGKILL resumes to the same final weights, also on another number of ranks;
the torchrun launcher works end to end from a Dagster asset under Pipes, and a re-executed asset resumes."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import polars as pl
import pytest
import torch

from pipelines.rm.model import load_reward_model
from pipelines.rm.store import PairSource, SourceTable, build_token_store
from pipelines.rm.tiny import build_tiny_decoder
from pipelines.rm.train import TrainConfig
from tests.rm_helpers import synth_rows

ROOT = Path(__file__).resolve().parents[1]
GUARD = 300  # seconds: only a guard against a hang, never a speed expectation


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_decoder(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3")


def _store(tmp: Path, backbone: str, rows: list[dict], max_len: int = 128):
    tmp.mkdir(parents=True, exist_ok=True)
    cols = ["pair_id", "history", "chosen", "rejected"]
    pl.DataFrame(rows).select(cols).write_parquet(tmp / "pairs.parquet")
    return build_token_store(PairSource([SourceTable(str(tmp / "pairs.parquet"))]), backbone, tmp / "stores",
                             max_len=max_len, parallel="inprocess").store


def _spec(tmp: Path, backbone: str, store, val: list[dict], cfg: TrainConfig, out: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    cols = ["pair_id", "history", "chosen", "rejected"]
    (pl.DataFrame(val).select(cols) if val else pl.DataFrame(schema={c: pl.String for c in cols})).write_parquet(
        tmp / "val.parquet")
    spec = {"backbone": backbone, "store": str(store.path), "val": str(tmp / "val.parquet"), "config": asdict(cfg),
            "out_dir": out, "result": str(tmp / "result.json")}
    (tmp / "spec.json").write_text(json.dumps(spec))
    return tmp / "spec.json"


def _torchrun(spec: Path, nproc: int, kill_at: int | None = None, wait: bool = True) -> subprocess.CompletedProcess:
    entry = "tests.kill_launch" if kill_at else "pipelines.rm.launch"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "SYNPREF_TEST_KILL_AT": str(kill_at or 0),
           "TQDM_DISABLE": "1"}
    if not wait:
        env["SYNPREF_TEST_KILL_NO_WAIT"] = "1"
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           "-m", entry, str(spec)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=GUARD)


def _weights(folder: str) -> dict[str, torch.Tensor]:
    return load_reward_model(folder).model.state_dict()


def _worst(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_two_ranks_split_every_global_batch_and_match_one_process(tiny, tmp_path):
    rows = synth_rows(40, seed=11)[:30]
    store = _store(tmp_path / "data", tiny, rows)
    # plain SGD, no clipping: a wrong loss scale (per rank, per micro-batch) changes the weights
    base = dict(lr=0.05, batch_size=8, epochs=2.0, max_len=128, eval_every=1000, save_last_every=1000,
                progress=False, record_order=True, layout="shared_prefix", optimizer="sgd", max_grad_norm=0.0)
    two = _torchrun(_spec(tmp_path / "two", tiny, store, [], TrainConfig(**base, loader_workers=1),
                          str(tmp_path / "two/out")), 2)
    assert two.returncode == 0, two.stderr[-3000:]
    res = json.loads((tmp_path / "two" / "result.json").read_text())
    assert res["world_size"] == 2 and res["steps"] == 8  # ceil(30 / 8) x 2 epochs
    assert res["pieces"] == 0 and {h["micro_steps"] for h in res["history"]} == {1}  # cut by tokens: 1 each
    # disjoint data: in each epoch the two ranks together saw every pair exactly once
    seen = {r: [json.loads(line) for line in (tmp_path / "two/out" / f"order-rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)}
    for epoch in (range(1, 5), range(5, 9)):
        ids = [p for r in (0, 1) for rec in seen[r] if rec["step"] in epoch for p in rec["pair_ids"]]
        assert sorted(ids) == sorted(r["pair_id"] for r in rows)
    first = {p for r in (0, 1) for rec in seen[r] if rec["step"] == 1 for p in rec["pair_ids"]}
    again = {p for r in (0, 1) for rec in seen[r] if rec["step"] == 5 for p in rec["pair_ids"]}
    assert first != again  # batches are drawn anew each epoch
    assert {h["global_batch"] for h in res["history"]} == {8, 6}
    # the same global batches in one process (2 micro-batches by accumulation) give the same weights
    one = _torchrun(_spec(tmp_path / "one", tiny, store, [], TrainConfig(**{**base, "grad_accum": 2}),
                          str(tmp_path / "one/out")), 1)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = _weights(str(tmp_path / "two/out/best")), _weights(str(tmp_path / "one/out/best"))
    init = load_reward_model(tiny).model.state_dict()
    moved = max(float((a[k] - init[k]).abs().max()) for k in a if k in init and "embed" not in k)
    worst = _worst(a, b)
    assert moved > 1e-2 and worst < 1e-6, (worst, moved)  # float sums in another order only


@pytest.mark.slow
def test_each_rank_loads_only_its_shards_and_gets_the_hf_weights(tiny, tmp_path):
    script = tmp_path / "load.py"
    script.write_text(f"""
import json, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from pipelines.rm.fsdp import load_sharded_reward_model
rm = load_sharded_reward_model({tiny!r}, device="cpu", seed=3)
local = sum(p.to_local().numel() for p in rm.model.parameters())
full = sum(p.numel() for p in rm.model.parameters())
sd = get_model_state_dict(rm.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if torch.distributed.get_rank() == 0:
    torch.save(sd, {str(tmp_path / 'full.pt')!r})
    print(json.dumps({{"local": local, "full": full, "sharded": all(isinstance(p, DTensor) for p in rm.model.parameters())}}))
torch.distributed.destroy_process_group()
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=GUARD)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["sharded"] and info["local"] <= info["full"] // 2 + 1024  # a rank holds about half the weights
    got = torch.load(tmp_path / "full.pt")
    ref = load_reward_model(tiny).model.state_dict()
    for k, v in ref.items():
        if k == "score.weight":  # a new head: seeded, drawn the same on every rank
            assert got[k].shape == v.shape and got[k].std() > 0
        elif "embed_tokens" in k:  # the reward pad row is new (zero here, sampled by HF's resize)
            assert torch.equal(got[k][:-1], v[:-1]) and got[k].shape == v.shape
        else:
            assert torch.equal(got[k], v), k


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights_also_on_one_rank(tiny, tmp_path):
    rows = synth_rows(40, seed=12)[:32]
    val = synth_rows(12, seed=13)[:8]
    store = _store(tmp_path / "data", tiny, rows)
    cfg = TrainConfig(lr=1e-3, batch_size=8, epochs=2.0, max_len=128, eval_every=3, save_last_every=2,
                      progress=False, layout="shared_prefix")
    clean = _torchrun(_spec(tmp_path / "clean", tiny, store, val, cfg, str(tmp_path / "clean/out")), 2)
    assert clean.returncode == 0, clean.stderr[-3000:]
    res = json.loads((tmp_path / "clean" / "result.json").read_text())
    assert res["steps"] == 8 and res["world_size"] == 2
    assert all("val_accuracy" in h for h in res["history"] if h["step"] % 3 == 0)  # sharded, all-reduced
    ref = _weights(str(tmp_path / "clean/out/best"))
    for resume_ranks in (2, 1):
        # kill -9 rank 0 right after step 3 (the step-2 checkpoint is written), then run the same spec again
        d = tmp_path / f"killed{resume_ranks}"
        spec = _spec(d, tiny, store, val, cfg, str(d / "out"))
        dead = _torchrun(spec, 2, kill_at=3)
        assert dead.returncode != 0 and json.loads((d / "out/checkpoints/latest").read_text())["step"] == 2
        assert (d / "out/checkpoints/step-2/trainer_state.pt").exists() and not (d / "out/best").exists()
        again = _torchrun(spec, resume_ranks)
        assert again.returncode == 0, again.stderr[-3000:]
        res2 = json.loads((d / "result.json").read_text())
        assert res2["resumed_from_step"] == 2 and res2["steps"] == 8 and res2["world_size"] == resume_ranks
        # micro-batches cut by tokens on each world size: the same global batches, accumulation absorbs the change
        assert res2["pieces"] == 0 and res2["micro_batch_tokens"] > 0
        worst = _worst(ref, _weights(str(d / "out/best")))
        # same ranks: the same operations in the same order; one rank: float sums in another order only
        assert worst < (1e-6 if resume_ranks == 2 else 1e-5), (resume_ranks, worst)
        # the finished run started again: its result back, no training (no rank writes a step)
        before = {p: p.stat().st_mtime_ns for p in (d / "out").rglob("*") if p.is_file()}
        noop = _torchrun(spec, 2)
        assert noop.returncode == 0, noop.stderr[-3000:]
        assert "this run finished at step 8" in noop.stdout
        assert json.loads((d / "result.json").read_text())["history"] == res2["history"]
        assert {p: p.stat().st_mtime_ns for p in (d / "out").rglob("*") if p.is_file()} == before
    # a kill with no wait (a background save may be in flight): the resume starts from the last committed step
    d = tmp_path / "inflight"
    spec = _spec(d, tiny, store, val, cfg, str(d / "out"))
    dead = _torchrun(spec, 2, kill_at=5, wait=False)
    assert dead.returncode != 0
    committed = json.loads((d / "out/checkpoints/latest").read_text())["step"]
    again = _torchrun(spec, 2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((d / "result.json").read_text())["resumed_from_step"] == committed and committed in (2, 4)
    assert _worst(ref, _weights(str(d / "out/best"))) < 1e-6


@pytest.mark.slow
def test_accumulation_sync_every_step_and_last_step_reach_fsdp_and_give_the_same_weights(tiny, tmp_path):
    """accum_sync under FSDP2 on 2 gloo ranks with 2 micro-batches per rank: every_step reduces after each
    micro-batch (the sharded gradient exists after the first backward), last_step only after the last; plain SGD
    without clipping, so a lost or doubled micro-batch gradient would change the weights."""
    rows = synth_rows(40, seed=16)[:24]
    store = _store(tmp_path / "data", tiny, rows)
    base = dict(lr=0.05, batch_size=8, max_steps=3, max_len=128, eval_every=1000, save_last_every=1000,
                progress=False, layout="shared_prefix", optimizer="sgd", max_grad_norm=0.0, grad_accum=2)
    got = {}
    for setting in ("every_step", "last_step", "auto"):
        d = tmp_path / setting
        run = _torchrun(_spec(d, tiny, store, [], TrainConfig(**base, accum_sync=setting), str(d / "out")), 2)
        assert run.returncode == 0, run.stderr[-3000:]
        got[setting] = json.loads((d / "result.json").read_text())
        assert {h["micro_steps"] for h in got[setting]["history"]} == {2}
    assert got["every_step"]["accum_sync"] == "every_step" and got["last_step"]["accum_sync"] == "last_step"
    assert {h["synced_micro_steps"] for h in got["every_step"]["history"]} == {2}  # reduced on both micro-steps
    assert {h["synced_micro_steps"] for h in got["last_step"]["history"]} == {1}  # only on the last
    assert got["auto"]["accum_sync"] == "last_step"  # a tiny model on CPU: the unsharded gradients fit
    a, b = _weights(str(tmp_path / "every_step/out/best")), _weights(str(tmp_path / "last_step/out/best"))
    init = load_reward_model(tiny).model.state_dict()
    moved = max(float((a[k] - init[k]).abs().max()) for k in a if k in init and "embed" not in k)
    assert moved > 1e-2 and _worst(a, b) < 1e-6, (moved, _worst(a, b))


def test_accum_sync_auto_follows_the_memory_estimate_and_a_last_step_that_cannot_fit_is_refused():
    from pipelines.rm.fsdp import no_sync_bytes, resolve_accum_sync
    from pipelines.rm.memory import GiB, MemoryPlanError

    params = 8_000_000_000  # an 8B model: 32 GB of unsharded fp32 gradients per rank under last_step
    assert no_sync_bytes(params) == 32_000_000_000
    kw = dict(distributed=True, params=params, peak=40 * GiB)
    assert resolve_accum_sync("auto", limit=68 * GiB, **kw) == "every_step"  # an 80 GB GPU x 0.85
    assert resolve_accum_sync("auto", limit=120 * GiB, **kw) == "last_step"  # room for them
    assert resolve_accum_sync("every_step", limit=120 * GiB, **kw) == "every_step"
    with pytest.raises(MemoryPlanError, match="accum_sync=every_step"):
        resolve_accum_sync("last_step", limit=68 * GiB, **kw)
    assert resolve_accum_sync("last_step", distributed=False, params=params, peak=0, limit=0) == "last_step"
    with pytest.raises(ValueError, match="accum_sync must be one of"):
        resolve_accum_sync("sometimes", limit=68 * GiB, **kw)


def _seed_lake(home: Path, n: int = 60, seed: int = 14) -> None:
    from pipelines.lake import Lake
    from pipelines.review.seed import SEED, gold_split

    rows = synth_rows(n, seed=seed)
    frame = pl.DataFrame([{**{k: r[k] for k in ("pair_id", "history", "chosen", "rejected")},
                           "label_origin": "human", "split": gold_split(r["pair_id"], 0.2, 0.2),
                           "task_category": r["category"]} for r in rows])
    Lake(str(home / "lake")).overwrite(SEED, frame.to_arrow())


@pytest.mark.slow
def test_gold_rm_trains_through_torchrun_under_pipes_and_a_reexecuted_run_resumes(tiny, synpref_home, monkeypatch):
    """gold_rm with TrainerResource(launcher="torchrun", nproc_per_node=2): the launch goes through Dagster Pipes
    (each step's line reaches the run's log, MLflow gets every step live from rank 0). A run killed with SIGKILL
    mid-epoch fails the step; materializing the asset again (a new Dagster run, same inputs and config) resumes
    from the last checkpoint and ends with the weights of an uninterrupted run."""
    import dagster as dg
    from mlflow.tracking import MlflowClient

    from assets.rm import gold_rm
    from resources.compute import ComputeResource
    from resources.lake import LakeResource
    from resources.mlflow import MlflowResource
    from resources.trainer import TrainerResource

    _seed_lake(synpref_home)
    run_config = {"ops": {"gold_rm": {"config": {"backbone": tiny, "epochs": 3.0, "batch_size": 8, "max_len": 96,
                                                  "eval_every": 2, "save_last_every": 2}}}}

    def materialize(instance, module="pipelines.rm.launch"):
        return dg.materialize([gold_rm], instance=instance, raise_on_error=False, run_config=run_config, resources={
            "lake_store": LakeResource(), "mlflow_store": MlflowResource(), "compute": ComputeResource(engine="inprocess"),
            "trainer": TrainerResource(launcher="torchrun", nproc_per_node=2, module=module)})

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SYNPREF_TEST_KILL_AT", "3")
    with dg.instance_for_test() as inst:
        dead = materialize(inst, "tests.kill_launch")
        assert not dead.success
        logs = [e.message for e in inst.all_logs(dead.run_id) if e.message]
        assert any("step " in m and "loss=" in m for m in logs)  # Pipes brought the steps into the run's log
        again = materialize(inst)
        assert again.success
        meta = again.asset_materializations_for_node("gold_rm")[0].metadata
        assert meta["world_size"].value == 2 and meta["resumed_from_step"].value == 2
        client = MlflowClient()
        run = client.get_run(meta["mlflow_run_id"].value)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert steps == list(range(3, meta["steps"].value + 1))  # logged live, from the resumed step on
        # materialized again once finished: the finished result, no step trained, the model files untouched
        best = Path(meta["model_dir"].value) / "best"
        stamp = {p: p.stat().st_mtime_ns for p in best.rglob("*")}
        third = materialize(inst)
        assert third.success
        m3 = third.asset_materializations_for_node("gold_rm")[0].metadata
        assert m3["steps"].value == meta["steps"].value and m3["model_dir"].value == meta["model_dir"].value
        assert {p: p.stat().st_mtime_ns for p in best.rglob("*")} == stamp
        assert not any("step " in e.message and "loss=" in e.message for e in inst.all_logs(third.run_id)
                       if e.message)
    # the uninterrupted run (a fresh home, same data and config) ends with the same weights
    first = Path(meta["model_dir"].value) / "best"
    assert first.exists()
    resumed = _weights(str(first))
    other = synpref_home.parent / "home2"
    other.mkdir()
    monkeypatch.setenv("SYNPREF_HOME", str(other))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}/mlflow.db")
    _seed_lake(other)
    with dg.instance_for_test() as inst:
        clean = materialize(inst)
        assert clean.success
        m2 = clean.asset_materializations_for_node("gold_rm")[0].metadata
        assert m2["resumed_from_step"].value == 0
    assert _worst(resumed, _weights(str(Path(m2["model_dir"].value) / "best"))) < 1e-6


def test_the_k8s_launcher_builds_a_pod_that_runs_torchrun_on_the_nodes_gpus_and_the_shared_volume(tmp_path,
                                                                                                  monkeypatch):
    """dagster-k8s' own pod builder over the resource's spec: the pod runs the same torchrun command as the local
    launcher, asks for the node's GPUs, gets a memory-backed /dev/shm and mounts the PVC at SYNPREF_HOME's path."""
    from dagster_k8s.pipes import build_pod_body

    from resources.trainer import TrainerResource

    monkeypatch.setenv("SYNPREF_HOME", str(tmp_path))
    t = TrainerResource(launcher="k8s", nproc_per_node=8, k8s_image="synpref:1", k8s_volume_claim="synpref-home")
    body = build_pod_body("rm", t.k8s_image, t.torchrun_command("/s/spec.json", python="python"), t.k8s_env(), None,
                          t.k8s_pod_spec())
    c = body.spec.containers[0]
    assert c.image == "synpref:1" and c.command[:3] == ["python", "-m", "torch.distributed.run"]
    assert "--nproc-per-node=8" in c.command and c.command[-3:] == ["-m", "pipelines.rm.launch", "/s/spec.json"]
    assert c.resources.limits == {"nvidia.com/gpu": "8"} and body.spec.restart_policy == "Never"
    assert {(m.name, m.mount_path) for m in c.volume_mounts} == {("dshm", "/dev/shm"), ("synpref-home", str(tmp_path))}
    vols = {v.name: v for v in body.spec.volumes}
    assert vols["dshm"].empty_dir.medium == "Memory"
    assert vols["synpref-home"].persistent_volume_claim.claim_name == "synpref-home"
    assert {e.name: e.value for e in c.env}["SYNPREF_HOME"] == str(tmp_path)
    # a multi-node job is one pod per node started together: one pod alone must not pretend to be one
    multi = TrainerResource(launcher="k8s", nnodes=2, k8s_image="synpref:1")
    with pytest.raises(ValueError, match="one pod"):
        multi.train("b", object(), [], TrainConfig(), str(tmp_path / "o"), context=object())


@pytest.mark.slow
def test_a_bf16_hub_checkpoint_trains_with_fp32_master_weights_under_torchrun(tiny, tmp_path, monkeypatch):
    """A hub id (resolved offline from the local HF cache) whose weights are stored in bf16, trained by 2 gloo ranks
    at lr 3e-6: every rank loads its shards in fp32 (the optimizer's master copy), so the weights move as much as
    those of the same backbone stored in fp32 (before: the hub path trained the bf16 weights themselves)."""
    from tests.rm_helpers import changed_fraction, stored_copy

    cache = tmp_path / "hub"
    snap = cache / "models--synpref--tiny-bf16" / "snapshots" / ("0" * 40)
    stored_copy(tiny, snap, torch.bfloat16)
    (cache / "models--synpref--tiny-bf16" / "refs").mkdir(parents=True)
    (cache / "models--synpref--tiny-bf16" / "refs" / "main").write_text("0" * 40)
    fp32 = stored_copy(tiny, tmp_path / "fp32", torch.float32)
    rows = synth_rows(40, seed=15)[:32]
    store = _store(tmp_path / "data", tiny, rows)
    cfg = TrainConfig(lr=3e-6, batch_size=8, max_steps=4, warmup_ratio=0.0, max_len=128, eval_every=100,
                      save_last_every=1000, progress=False)
    moved = {}
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, backbone, local in (("fp32", fp32, fp32), ("bf16", "synpref/tiny-bf16", str(snap))):
        d = tmp_path / name
        run = _torchrun(_spec(d, backbone, store, [], cfg, str(d / "out")), 2)
        assert run.returncode == 0, run.stderr[-3000:]
        after = _weights(str(d / "out/best"))
        assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())
        before = load_reward_model(local, dtype=torch.float32).model.state_dict()  # its own start, in fp32
        moved[name] = changed_fraction(before, after)
    assert moved["fp32"] > 0.5 and abs(moved["bf16"] - moved["fp32"]) < 0.02, moved
