"""Multi-node RM training started by Slurm (issue 32.6): the `slurm` launcher runs `srun ... python -m
pipelines.rm.slurm spec.json`, and each node runs torchrun's own entry for its share of a c10d rendezvous.

What can run here, does: the srun line and each node's torchrun arguments, exactly; two "nodes" (two processes
with Slurm's per-node environment, one rank each, gloo on CPU) that meet in a real rendezvous and train one job;
the same two nodes under a Dagster asset through the launcher's Pipes client (context and messages as files in the
spec's folder), with every step's message read while the job runs and the result reported once. Only srun itself
is not run (there is no Slurm here): the asset test stands in for it with the two processes it would start."""

import json
import os
import shlex
import signal
import subprocess
from pathlib import Path

import polars as pl
import pytest

from pipelines.rm.launch import write_spec
from pipelines.rm.slurm import SlurmNode, entry_command, first_host, node_argv, slurm_node
from pipelines.rm.store import PairSource, SourceTable, build_token_store
from pipelines.rm.tiny import build_tiny_decoder
from pipelines.rm.train import TrainConfig
from resources.trainer import TrainerResource
from tests.rm_helpers import synth_rows
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
GUARD = 300  # seconds: only a guard against a hang, never a speed expectation
JOB = "4242"


def _cfg() -> TrainConfig:
    return TrainConfig(lr=1e-3, batch_size=8, max_steps=2, max_len=128, eval_every=1000, save_last_every=1000,
                       progress=False)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """A tiny random Qwen3 and a token store of 24 pairs (built once for the module)."""
    tmp = tmp_path_factory.mktemp("slurm")
    backbone = build_tiny_decoder(tmp / "qwen3", "qwen3")
    pl.DataFrame(synth_rows(30, seed=21)[:24]).select(["pair_id", "history", "chosen", "rejected"]).write_parquet(
        tmp / "pairs.parquet")
    store = build_token_store(PairSource([SourceTable(str(tmp / "pairs.parquet"))]), backbone, tmp / "stores",
                              max_len=128, parallel="inprocess").store
    return backbone, store


# what srun puts in every node's environment for a 2-node step on this machine (SLURM_NODEID: per node)
STEP_ENV = {"SLURM_NNODES": "2", "SLURM_JOB_ID": JOB, "SLURM_JOB_NODELIST": "localhost", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}


def _inherited() -> list[str]:
    """Variables of a surrounding Slurm job or Pipes session that must not leak into the nodes."""
    return [k for k in os.environ if k.startswith(("SLURM_", "DAGSTER_PIPES_")) or k == "SYNPREF_RDZV_HOST"]


def test_the_srun_line_and_each_nodes_torchrun_arguments_for_a_two_node_job(monkeypatch):
    t = TrainerResource(launcher="slurm", nnodes=2, nproc_per_node=8, slurm_partition="gpu",
                        slurm_extra_args=["--account=rm", "--time=24:00:00"], slurm_python="/venv/bin/python")
    assert t.srun_command("/shared/rm/launch/spec.json") == [
        "srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--export=ALL", "--quit-on-interrupt",
        "--partition=gpu", "--gpus-per-node=8", "--account=rm", "--time=24:00:00",
        "/venv/bin/python", "-m", "pipelines.rm.slurm", "--nproc-per-node=8", "--rdzv-port=29400",
        "--module=pipelines.rm.launch", "/shared/rm/launch/spec.json"]
    cpu = TrainerResource(launcher="slurm", nnodes=2, slurm_gpus_per_node=0, rdzv_port=31000).srun_command("/s.json")
    assert not any(a.startswith(("--gpus-per-node", "--partition")) for a in cpu) and "--rdzv-port=31000" in cpu
    # each node: its rank from Slurm, node 0's host as the endpoint, node 0 hosting the store, the job as the id
    env = {"SLURM_NNODES": "2", "SLURM_JOB_ID": JOB, "SLURM_JOB_NODELIST": "gpu-a,gpu-b"}
    argv = {r: node_argv("/shared/rm/launch/spec.json", slurm_node({**env, "SLURM_NODEID": str(r)}), nproc=8)
            for r in (0, 1)}
    for r in (0, 1):
        assert argv[r] == ["--nproc-per-node=8", "--nnodes=2", f"--node-rank={r}", "--rdzv-backend=c10d",
                           "--rdzv-endpoint=gpu-a:29400", f"--rdzv-id=synpref-{JOB}",
                           f"--rdzv-conf=is_host={int(r == 0)}", "-m", "pipelines.rm.launch",
                           "/shared/rm/launch/spec.json"]
    # the step's variables win over the job's (an srun of fewer nodes than the allocation); a compressed list is
    # expanded by Slurm (here a stand-in for `scontrol show hostnames`); the override wins over both
    step = {**env, "SLURM_NODEID": "0", "SLURM_NNODES": "4", "SLURM_STEP_NUM_NODES": "2",
            "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_STEP_NODELIST": "gpu[03-04]"}
    seen = []
    node = slurm_node(step, expand=lambda s: seen.append(s) or ["gpu03", "gpu04"])
    assert node == SlurmNode(nnodes=2, node_rank=0, job_id=JOB, head="gpu03") and seen == ["gpu[03-04]"]
    assert slurm_node({**step, "SYNPREF_RDZV_HOST": "10.0.0.3"}, expand=lambda s: []).head == "10.0.0.3"
    assert first_host("node7") == "node7" and first_host("a1,b2") == "a1"
    with pytest.raises(ValueError, match="srun"):
        slurm_node({"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "a"})  # no SLURM_NODEID: not a step's task
    # the deployment sets the job's shape from its environment
    from resources.env import env_config

    cfg = env_config("trainer", {"SYNPREF_TRAINER_LAUNCHER": "slurm", "SYNPREF_TRAINER_NNODES": "4",
                                 "SYNPREF_TRAINER_SLURM_PARTITION": "gpu"})
    assert {k: v.env_var_name for k, v in cfg.items()} == {
        "launcher": "SYNPREF_TRAINER_LAUNCHER", "nnodes": "SYNPREF_TRAINER_NNODES",
        "slurm_partition": "SYNPREF_TRAINER_SLURM_PARTITION"}
    with pytest.raises(ValueError, match="Dagster step"):
        TrainerResource(launcher="slurm", nnodes=2).train("b", object(), [], TrainConfig(), "/nowhere")


@pytest.mark.slow
def test_two_slurm_nodes_meet_in_one_rendezvous_and_train_one_job(tiny_store, tmp_path):
    """Two processes `python -m pipelines.rm.slurm spec.json`, as srun starts them on two nodes (SLURM_NODEID 0 and
    1, the job's node list naming this machine): node 1 is started first and waits for node 0's store; each node's
    torchrun spawns its one rank; the two ranks train the job together."""
    backbone, store = tiny_store
    spec = write_spec(backbone, store, [], _cfg(), str(tmp_path / "out"))
    cmd = entry_command(str(spec), nproc=1, port=free_port())
    env = {k: v for k, v in os.environ.items() if k not in _inherited()}
    procs = {r: subprocess.Popen(cmd, cwd=ROOT, env={**env, **STEP_ENV, "SLURM_NODEID": str(r)}, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
             for r in (1, 0)}
    out = {}
    try:
        for r, p in procs.items():
            out[r] = p.communicate(timeout=GUARD)[0]
    finally:
        for p in procs.values():
            if p.poll() is None:  # a hang: end the node's whole session (its torchrun and ranks)
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for r in (0, 1):
        assert procs[r].returncode == 0, out[r][-3000:]
        assert f"node {r}/2 of job {JOB}" in out[r]
    res = json.loads((spec.parent / "result.json").read_text())
    assert res["world_size"] == 2 and res["steps"] == 2 and [h["step"] for h in res["history"]] == [1, 2]
    assert (tmp_path / "out" / "best" / "config.json").exists() and not (spec.parent / "refused.txt").exists()


@pytest.mark.slow
def test_the_slurm_launcher_reports_each_step_through_pipes_files_while_the_job_runs(tiny_store, tmp_path,
                                                                                       synpref_home, monkeypatch):
    """TrainerResource(launcher="slurm").train under a Dagster asset, with srun's part played by the two processes
    srun would start (a bash line, same per-node command): Pipes context and messages go through files in the
    spec's folder, global rank 0 (on either node) alone reports; each step arrives as a log line and a custom
    message before the job has written its result, and the result once."""
    import dagster as dg

    import resources.trainer as trainer_module

    backbone, store = tiny_store
    port = free_port()
    for k in _inherited():
        monkeypatch.delenv(k)
    for k, v in STEP_ENV.items():  # the step's environment: srun --export=ALL passes it on to every node
        monkeypatch.setenv(k, v)

    def two_local_nodes(self, spec_path: str) -> list[str]:
        """What srun would do: the launcher's per-node command on each node, its exit the worst of the two."""
        node = shlex.join(entry_command(spec_path, nproc=self.nproc_per_node, port=self.rdzv_port,
                                        module=self.module))
        both = (f"SLURM_NODEID=1 {node} & n1=$!; SLURM_NODEID=0 {node} & n0=$!; "
                "wait $n0; r0=$?; wait $n1; r1=$?; exit $((r0 | r1))")
        return ["timeout", "-k", "10", str(GUARD), "bash", "-c", both]

    received: list = []
    real_read_result = trainer_module.read_result

    def read_result_spy(spec_path, messages=None):
        received.extend(messages or [])
        return real_read_result(spec_path, messages)

    monkeypatch.setattr(TrainerResource, "srun_command", two_local_nodes)
    monkeypatch.setattr(trainer_module, "read_result", read_result_spy)
    out_dir = tmp_path / "out"

    @dg.asset
    def slurm_rm(context: dg.AssetExecutionContext, trainer: TrainerResource) -> dg.MaterializeResult:
        res = trainer.train(backbone, store, [], _cfg(), str(out_dir), context=context)
        return dg.MaterializeResult(metadata={"world_size": res.world_size, "steps": res.steps})

    with dg.instance_for_test() as inst:
        run = dg.materialize([slurm_rm], instance=inst, resources={
            "trainer": TrainerResource(launcher="slurm", nnodes=2, nproc_per_node=1, rdzv_port=port)})
        assert run.success
        meta = run.asset_materializations_for_node("slurm_rm")[0].metadata
        assert meta["world_size"].value == 2 and meta["steps"].value == 2
        step_logs = [e for e in inst.all_logs(run.run_id) if e.message and e.message.startswith("step ")
                     and "loss=" in e.message]
    launch = out_dir / "launch"
    assert [m["step"] for m in received if m.get("kind") == "step"] == [1, 2]  # one reporter: no rank doubles them
    assert [m["kind"] for m in received].count("result") == 1
    assert [e.message.rsplit("(", 1)[1] for e in step_logs] == ["1)", "2)"]
    # live: both steps were in Dagster's log before rank 0 wrote the result, i.e. while the job ran
    assert max(e.timestamp for e in step_logs) < (launch / "result.json").stat().st_mtime
    # they came through the spec's (shared) folder: the messages file rank 0 appended to, kept for a post-mortem
    sent = [json.loads(line) for line in (launch / "pipes_messages.jsonl").read_text().splitlines()]
    assert [m["params"]["payload"] for m in sent if m["method"] == "report_custom_message"] == received
    methods = [m["method"] for m in sent]
    assert methods.count("opened") == 1 and methods.count("closed") == 1  # one process of the job talked to Pipes
    assert not (launch / "pipes_context.json").exists()  # the context file goes with the session
