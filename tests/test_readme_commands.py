"""Every command README.md shows is run, as written, by a test: the table below maps each one to the test that runs
it (or to why it is too expensive for the suite), and a README command without an entry fails
`test_every_readme_command_is_mapped_to_a_test`. The commands no other test ran as written are run here, through the
console scripts, with the README's flags; only file paths, model paths and ports are swapped for small local ones
(a fixed port would collide on a shared box)."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import polars as pl
import pytest

from tests.servers import free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
SYNPREF = BIN / "synpref"
HERE = "tests/test_readme_commands.py::"

# README command -> the test that runs it ("path::test"), or why the suite does not ("too expensive: ...").
RUN_BY: dict[str, str] = {
    # Quickstart
    "make demo": "too expensive: `synpref demo` at its default scale (small: the whole pipeline on 2,400 pairs, "
                 "minutes on 2 cores); tests/test_e2e.py::test_demo_runs_every_asset_end_to_end runs the same entry "
                 "point, `synpref demo --scale tiny`, on its default Ray engine",
    "make test": "too expensive: it is the whole suite (this test is part of it)",
    "synpref demo": "tests/test_e2e.py::test_demo_runs_every_asset_end_to_end",
    "synpref demo --verbose": "too expensive: a second whole-pipeline run only to stream the event log; the quiet "
                              "run is tests/test_e2e.py::test_demo_runs_every_asset_end_to_end",
    "synpref demo --scale tiny|small|medium": "tests/test_e2e.py::test_demo_runs_every_asset_end_to_end",
    "make ui": "not run: `dagster dev -w workspace.yaml` (webserver + daemon + code server) on 2 shared cores; the "
               "webserver and daemon over the same Definitions are run by "
               "tests/test_dagster_servers.py::test_run_launched_through_the_webserver_is_executed_by_the_daemon "
               "(with -m definitions, not workspace.yaml)",
    ".venv/bin/mlflow ui --backend-store-uri sqlite:///.synpref/mlflow/mlflow.db":
        HERE + "test_mlflow_ui_reads_the_store_the_demo_writes",
    "mlflow server": "tests/test_mlflow_server.py::test_train_and_register_against_an_mlflow_tracking_server",
    "export SYNPREF_LLM_BACKEND=simulated": HERE + "test_dagster_materialize_registers_the_shards_as_written",
    "dagster asset materialize -m definitions --select synthetic_landing,synth_truth":
        HERE + "test_dagster_materialize_registers_the_shards_as_written",
    "dagster job execute -m definitions -j main_job --tags '{\"dagster/asset_partition_range_start\": "
    "\"synth/shard-000.jsonl\", \"dagster/asset_partition_range_end\": \"synth/shard-contaminated.jsonl\"}'":
        "too expensive: main_job at its defaults is the whole pipeline over 3,000 pairs (longer than `make demo`); "
        "the same job over the same partition-range tags is run by `synpref demo` in "
        "tests/test_e2e.py::test_demo_runs_every_asset_end_to_end. Checking that `dagster job execute ... --help` "
        "parses, or that the job loads, is NOT a substitute and is not counted as one: the CLI path with these tags "
        "is not run by the suite",
    # Evaluation data
    ".venv/bin/synpref benchmarks add ~/Downloads/filtered-00000-of-00001.parquet":
        HERE + "test_benchmarks_commands_as_written",
    ".venv/bin/synpref benchmarks add chat_filtered.json --name rm-bench": HERE + "test_benchmarks_commands_as_written",
    ".venv/bin/synpref benchmarks add BoN_set/Harmlessness/S1.json --as S1_BoN.json":
        HERE + "test_benchmarks_commands_as_written",
    ".venv/bin/synpref benchmarks fetch judgebench": HERE + "test_benchmarks_commands_as_written",
    ".venv/bin/synpref benchmarks add \"dataset=judgebench,response_model=claude-3-5-sonnet-20240620.jsonl\"":
        HERE + "test_benchmarks_commands_as_written",
    ".venv/bin/synpref benchmarks list": HERE + "test_benchmarks_commands_as_written",
    ".venv/bin/synpref evaluate --model /models/Skywork-Reward-V2-Qwen3-0.6B --name skywork-0.6b --max-len 4096 "
    "--out out/": HERE + "test_evaluate_commands_as_written",
    ".venv/bin/synpref evaluate --model /models/Skywork-Reward-V2-Qwen3-0.6B --benchmarks rm-bench,judgebench":
        HERE + "test_evaluate_commands_as_written",
    "synpref evaluate": HERE + "test_evaluate_commands_as_written",
    # Serving
    "SYNPREF_RM_TOKEN=... .venv/bin/synpref serve --model models:/synpref-family-qwen3/1 --port 8001 --max-batch 32 "
    "--max-wait-ms 5 --max-queue 1024 --api-key-env SYNPREF_RM_TOKEN": HERE + "test_serve_command_as_written",
    # Human review
    ".venv/bin/synpref review add-annotator alice": HERE + "test_review_commands_as_written",
    ".venv/bin/synpref review add-annotator lena --lead": HERE + "test_review_commands_as_written",
    ".venv/bin/synpref review serve --port 8000 --lease-ttl 600": HERE + "test_review_commands_as_written",
    ".venv/bin/synpref review export queue.json --format labelstudio": HERE + "test_review_commands_as_written",
    ".venv/bin/synpref review import done.json --format labelstudio": HERE + "test_review_commands_as_written",
    ".venv/bin/synpref review compact": HERE + "test_review_commands_as_written",
    # Training
    ".venv/bin/synpref train-rm --pairs prefs.parquet --backbone <hf folder> --out runs/my-rm --nproc 2":
        "tests/test_token_store.py::test_the_readme_train_rm_example_with_the_papers_defaults_finishes_on_this_box",
    "synpref train-rm":
        "tests/test_token_store.py::test_the_readme_train_rm_example_with_the_papers_defaults_finishes_on_this_box",
}

INLINE = re.compile(r"^(make |\.venv/bin/|synpref |dagster |mlflow )")


def readme_commands() -> list[str]:
    """Every command line of README's ```bash blocks (continuations joined, trailing `# ...` comments and repeated
    blanks dropped) and every inline `code` span outside them that starts like a command."""
    cmds: list[str] = []
    in_block, bash, pending = False, False, ""
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_block, bash = not in_block, line.strip() == "```bash" and not in_block
            continue
        if in_block and bash:
            text = pending + " " + line.strip() if pending else line.strip()
            if text.endswith("\\"):
                pending = text[:-1].strip()
                continue
            pending = ""
            text = re.sub(r"\s+#\s.*$", "", text).strip()
            if text:
                cmds.append(re.sub(r"\s+", " ", text))
        elif not in_block:
            cmds += [s for s in re.findall(r"`([^`]+)`", line) if INLINE.match(s)]
    return list(dict.fromkeys(cmds))


def readme_line(prefix: str) -> str:
    """The README's command starting with `prefix` (exactly one), so a changed README line is what gets run."""
    hits = [c for c in readme_commands() if c.startswith(prefix)]
    assert len(hits) == 1, (prefix, hits)
    return hits[0]


def swap(cmd: str, old: str, new: str) -> str:
    assert old in cmd, (old, cmd)  # the README still says what this test substitutes
    return cmd.replace(old, new)


def as_local(cmd: str) -> str:
    """`.venv/bin/X` is this interpreter's console script X (the same file when the suite runs from .venv)."""
    return re.sub(r"(^|\s)\.venv/bin/(\w+)", lambda m: f"{m.group(1)}{BIN / m.group(2)}", cmd)


def sh(cmd: str, cwd: Path, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def env(tmp_path):
    """A fresh SynPref home, Dagster home and $HOME (for `~/` and the HF cache) under tmp_path."""
    home = tmp_path / "home"
    out = {k: v for k, v in os.environ.items()
           if k not in {"SYNPREF_LAKE_ROOT", "SYNPREF_LANDING_ROOT", "MLFLOW_TRACKING_URI", "HF_HOME",
                        "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "SYNPREF_LLM_BACKEND"}}
    out.update(SYNPREF_HOME=str(home), DAGSTER_HOME=str(home / "dagster"), HOME=str(tmp_path),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return out


def test_every_readme_command_is_mapped_to_a_test():
    cmds = readme_commands()
    assert len(cmds) >= 25, cmds  # the parser found the README's blocks
    missing = [c for c in cmds if c not in RUN_BY]
    assert not missing, f"README commands no test runs (add a test and an entry in RUN_BY): {missing}"
    stale = [c for c in RUN_BY if c not in cmds]
    assert not stale, f"RUN_BY entries the README no longer shows: {stale}"
    for cmd, by in RUN_BY.items():  # a named test exists; a reason says why it is not run
        if by.startswith("tests/"):
            path, _, name = by.partition("::")
            src = (ROOT / path).read_text()
            assert not name or f"def {name}(" in src, (cmd, by)
        else:
            assert by.startswith(("too expensive: ", "not run: ")), (cmd, by)


# --- Evaluation data ---------------------------------------------------------------------------------------------

def _rewardbench_rows() -> list[dict]:
    """allenai/reward-bench `filtered` rows with every published column."""
    subsets = ["alpacaeval-easy", "mt-bench-hard", "donotanswer", "math-prm", "xstest-should-respond"]
    return [{"prompt": f"prompt {i}", "chosen": f"a helpful answer {i}", "chosen_model": "gpt-4",
             "rejected": f"no {i}", "rejected_model": "llama-2-7b", "subset": s, "id": 30 + i}
            for i, s in enumerate(subsets)]


def _rmb_rows(kind: str) -> list[dict]:
    """RMB's Pairwise_set and BoN_set JSON rows (every column), Harmlessness S1."""
    conv = lambda i: [{"role": "user", "content": f"how do I {i}?", "language": "en"}]  # noqa: E731
    if kind == "pairwise":
        return [{"pair_uid": f"pw{i}", "category_path": "Pairwise_set/Harmlessness/S1", "subset": "S1",
                 "conversation_input": conv(i), "chosen": {"llm_name": "a", "answer": f"safely {i}"},
                 "reject": {"llm_name": "b", "answer": f"unsafely {i}"}} for i in range(3)]
    return [{"bon_uid": f"bon{i}", "category_path": "BoN_set/Harmlessness/S1", "conversation_input": conv(i),
             "bon_best": {"llm_name": "a", "answer": f"safe {i}"},
             "loser_list": [{"llm_name": "b", "answer": f"unsafe {i}"}, {"llm_name": "c", "answer": f"worse {i}"}]}
            for i in range(3)]


def test_benchmarks_commands_as_written(tmp_path, env):
    """README's six `synpref benchmarks` lines, verbatim, in a shell whose $HOME and working directory hold the
    published files under the README's own names (JudgeBench's from a Hugging Face cache laid out as the hub client
    does, offline)."""
    from tests.test_evaluate import _json_list, _judgebench_rows, _parquet, _rmb3

    work, bench = tmp_path / "work", Path(env["SYNPREF_HOME"]) / "benchmarks"
    _parquet(tmp_path / "Downloads" / "filtered-00000-of-00001.parquet", _rewardbench_rows())
    _json_list(work / "chat_filtered.json", [
        {"id": i, "subset": "alpacaeval", "prompt": f"chat q{i}", "chosen": _rmb3(i, "cc"), "rejected": _rmb3(i, "cr"),
         "error_key": "shoes", "error": "The wardrobe should not hold shoes."} for i in range(3)])
    _json_list(work / "Pairwise_set" / "Harmlessness" / "S1.json", _rmb_rows("pairwise"))
    _json_list(work / "BoN_set" / "Harmlessness" / "S1.json", _rmb_rows("bon"))
    (work / "dataset=judgebench,response_model=claude-3-5-sonnet-20240620.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in _judgebench_rows("claude-3-5-sonnet-20240620", 5, 0)))
    commit = "b" * 40  # the HF cache as hf_hub_download leaves it: refs/main -> snapshots/<commit>/<file>
    repo = tmp_path / ".cache" / "huggingface" / "hub" / "datasets--ScalerLab--JudgeBench"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    _parquet(repo / "snapshots" / commit / "data" / "gpt-00000-of-00001.parquet",
             _judgebench_rows("gpt-4o-2024-05-13", 5, 0))

    def run(prefix: str, ok: bool = True) -> subprocess.CompletedProcess:
        p = sh(as_local(readme_line(prefix)), work, env)
        assert (p.returncode == 0) == ok, (prefix, p.stdout[-2000:], p.stderr[-3000:])
        return p

    run(".venv/bin/synpref benchmarks add ~/")
    assert [f.name for f in (bench / "rewardbench").iterdir()] == ["filtered-00000-of-00001.parquet"]
    run(".venv/bin/synpref benchmarks add chat_filtered.json")
    assert [f.name for f in (bench / "rm-bench").iterdir()] == ["chat_filtered.json"]
    # RMB's Pairwise_set/.../S1.json lands first; then BoN_set/.../S1.json as written is refused without --as
    p = sh(f"{SYNPREF} benchmarks add Pairwise_set/Harmlessness/S1.json", work, env)
    assert p.returncode == 0, p.stderr[-2000:]
    p = sh(f"{SYNPREF} benchmarks add BoN_set/Harmlessness/S1.json", work, env)
    assert p.returncode == 1 and "refused: " in p.stderr and "--as" in p.stderr, p.stderr[-2000:]
    run(".venv/bin/synpref benchmarks add BoN_set/")
    assert sorted(f.name for f in (bench / "rmb").iterdir()) == ["S1.json", "S1_BoN.json"]
    assert json.loads((bench / "rmb" / "S1.json").read_text()) == _rmb_rows("pairwise")  # never overwritten
    run(".venv/bin/synpref benchmarks fetch judgebench")
    run('.venv/bin/synpref benchmarks add "dataset=judgebench')
    assert sorted(f.name for f in (bench / "judgebench").iterdir()) == [
        "JudgeBench.parquet", "dataset=judgebench,response_model=claude-3-5-sonnet-20240620.jsonl"]
    listed = run(".venv/bin/synpref benchmarks list").stdout
    assert "['judgebench', 'rewardbench', 'rm-bench', 'rmb']" in listed and "layouts:" in listed, listed
    from pipelines.evaluate.benchmarks import read_benchmarks

    _, stats = read_benchmarks(bench)  # what was added is read back as its benchmark
    assert {b: s["rows"] for b, s in stats.items()} == {"judgebench": 10, "rewardbench": 5, "rm-bench": 3, "rmb": 6}


@pytest.mark.slow
def test_evaluate_commands_as_written(tmp_path, env):
    """README's two `synpref evaluate` lines with the model folder swapped for a tiny random Qwen3 of the same folder
    name: all benchmarks and `--out out/` in the authors' formats; then `--benchmarks rm-bench,judgebench` alone,
    named after the folder."""
    from pipelines.evaluate.benchmarks import add_benchmark
    from pipelines.lake import Lake
    from pipelines.rm.tiny import build_tiny_decoder
    from pipelines.tables import RM_EVALUATION
    from tests.test_evaluate import _json_list, _judgebench_rows, _jsonl, _parquet, _rmb3

    bench = Path(env["SYNPREF_HOME"]) / "benchmarks"
    add_benchmark(_parquet(tmp_path / "src" / "filtered-00000-of-00001.parquet", _rewardbench_rows()), bench)
    add_benchmark(_json_list(tmp_path / "src" / "chat_filtered.json", [
        {"id": i, "subset": "alpacaeval", "prompt": f"chat q{i}", "chosen": _rmb3(i, "cc"), "rejected": _rmb3(i, "cr"),
         "error_key": "shoes", "error": "The wardrobe should not hold shoes."} for i in range(3)]), bench, "rm-bench")
    add_benchmark(_jsonl(tmp_path / "src" / "gpt.jsonl", _judgebench_rows("gpt-4o-2024-05-13", 5, 0)), bench)
    model = build_tiny_decoder(tmp_path / "models" / "Skywork-Reward-V2-Qwen3-0.6B", "qwen3")
    work = tmp_path / "work"
    work.mkdir()
    first = swap(readme_line(".venv/bin/synpref evaluate --model /models/Skywork-Reward-V2-Qwen3-0.6B --name"),
                 "/models/Skywork-Reward-V2-Qwen3-0.6B", model)
    p = sh(as_local(first), work, env, timeout=300)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    assert "external:skywork-0.6b" in p.stdout and "max_len <= 4096" in p.stdout, p.stdout[-2000:]
    summary = json.loads((work / "out" / "summary.json").read_text())
    assert set(summary) == {"rewardbench", "rm-bench", "judgebench"}
    assert (work / "out" / "rm-bench-chat.json").exists() and (work / "out" / "judgebench.jsonl").exists()
    second = swap(readme_line(".venv/bin/synpref evaluate --model /models/Skywork-Reward-V2-Qwen3-0.6B --benchmarks"),
                  "/models/Skywork-Reward-V2-Qwen3-0.6B", model)
    p = sh(as_local(second), work, env, timeout=300)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    rows = Lake(str(Path(env["SYNPREF_HOME"]) / "lake")).read(RM_EVALUATION)
    by_model = {v: sorted(set(rows.filter(pl.col("rm_version") == v)["benchmark"]))
                for v in rows["rm_version"].unique()}
    assert by_model == {"external:skywork-0.6b": ["judgebench", "rewardbench", "rm-bench"],
                        "external:Skywork-Reward-V2-Qwen3-0.6B": ["judgebench", "rm-bench"]}, by_model


# --- Serving -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.integration
def test_serve_command_as_written(tmp_path, env):
    """README's `synpref serve` line verbatim but for the token and the port: the model is registered as
    `synpref-family-qwen3` version 1 in the SynPref home's MLflow store, so `models:/synpref-family-qwen3/1` is the
    README's own URI. The bearer token is required; one OpenRLHF request is answered; SIGTERM stops it."""
    import mlflow

    from pipelines.rm.model import load_reward_model, save_reward_model
    from pipelines.rm.tiny import build_tiny_decoder
    from pipelines.rm.tracking import log_model_folder, run
    from pipelines.settings import default_mlflow_uri

    exported = str(tmp_path / "exported")
    save_reward_model(load_reward_model(build_tiny_decoder(tmp_path / "tiny", "qwen3", seed=3)), exported)
    old = {k: os.environ.get(k) for k in ("SYNPREF_HOME", "MLFLOW_TRACKING_URI")}
    prev_uri = mlflow.get_tracking_uri()
    os.environ["SYNPREF_HOME"] = env["SYNPREF_HOME"]
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        uri = default_mlflow_uri()  # what `synpref serve` reads when no --mlflow-uri is given
        with run(uri, "readme", "register", artifact_root=str(tmp_path / "artifacts")):
            assert log_model_folder(exported, "synpref-family-qwen3") == "1"
    finally:
        mlflow.set_tracking_uri(prev_uri)
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    port = free_port()
    cmd = swap(swap(readme_line("SYNPREF_RM_TOKEN="), "SYNPREF_RM_TOKEN=...", "SYNPREF_RM_TOKEN=readme-tok"),
               "--port 8001", f"--port {port}")
    log = tmp_path / "serve.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(["bash", "-c", as_local(cmd)], cwd=tmp_path, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", [proc], log, timeout=120)
        url = f"http://127.0.0.1:{port}"
        health = httpx.get(f"{url}/health", timeout=30).json()
        assert health["status"] == "ok" and health["limits"]["max_rows"] == 512, health
        body = {"query": ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>"]}
        assert httpx.post(f"{url}/get_reward", json=body, timeout=60).status_code == 401
        r = httpx.post(f"{url}/get_reward", json=body, headers={"Authorization": "Bearer readme-tok"}, timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["rewards"]) == 1 and len(r.json()["scores"]) == 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc in (0, -signal.SIGTERM), (rc, log.read_text()[-3000:])
    assert "serving" in log.read_text() and "bearer token required" in log.read_text(), log.read_text()[-3000:]


# --- Human review ------------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_review_commands_as_written(tmp_path, env):
    """README's six `synpref review` lines verbatim (a free port for `serve`), on a lake holding ingested
    project-made pairs and a review queue: tokens stored hashed, a lead, Label Studio export -> annotated file ->
    import into the ledger (twice), compaction of the ledger's files, and the app serving an item to alice."""
    from pipelines.ingest.run import ingest_shard
    from pipelines.lake import Lake
    from pipelines.review.ledger import VERDICTS
    from pipelines.review.queue import QUEUE, build_queue
    from pipelines.synth.generator import write_shard

    home = Path(env["SYNPREF_HOME"])
    lake = Lake(str(home / "lake"))
    truth = write_shard(tmp_path / "landing" / "s.jsonl", 30, seed=1, label_noise=0.0)
    ingest_shard(lake, str(tmp_path / "landing" / "s.jsonl"), source="synth", shard="synth/s.jsonl", run_id="r")
    raw = lake.read("raw_pairs", columns=["pair_id", "history", "chosen", "rejected"])
    cats = pl.DataFrame(truth).select("pair_id", task_category="category")
    # the queue carries the texts, as review_queue writes it (next_review_queue's candidates)
    annotated = raw.join(cats, on="pair_id", how="left").with_columns(
        pl.col("task_category").fill_null("chat"), objectivity=pl.lit("objective"), controversiality=pl.lit("low"))
    lake.overwrite(QUEUE, build_queue(annotated, size=10, queue_version="v1", overlap_frac=0.0))
    work = tmp_path / "work"
    work.mkdir()

    def run(prefix: str) -> str:
        p = sh(as_local(readme_line(prefix)), work, env)
        assert p.returncode == 0, (prefix, p.stdout[-2000:], p.stderr[-3000:])
        return p.stdout

    token = run(".venv/bin/synpref review add-annotator alice").strip().rsplit(" ", 1)[-1]
    run(".venv/bin/synpref review add-annotator lena --lead")
    stored = (home / "review" / "annotators.json").read_text()
    assert token not in stored and "alice" in stored and "lead" in stored
    assert "exported 10 tasks" in run(".venv/bin/synpref review export queue.json")
    tasks = json.loads((work / "queue.json").read_text())
    assert len(tasks) == 10
    # a queue written before review_queue carried the texts (empty text columns) exports raw_pairs' texts
    q = lake.read(QUEUE)
    lake.overwrite(QUEUE, q.with_columns(pl.lit(None, q.schema[c]).alias(c) for c in ("history", "chosen", "rejected"))
                   .to_arrow())
    assert "exported 10 tasks" in run(".venv/bin/synpref review export queue.json")
    assert json.loads((work / "queue.json").read_text()) == tasks
    lake.overwrite(QUEUE, q.to_arrow())
    for t in tasks:  # the annotator picks the shipped chosen answer, whichever side it was shown on
        side = "left" if t["data"]["order_shown"] == "chosen_first" else "right"
        t["annotations"] = [{"completed_by": {"email": "alice@x"}, "lead_time": 3.0,
                             "result": [{"type": "pairwise", "value": {"selected": side}}]}]
    for part in (tasks[:4], tasks[4:8]):  # two imports, two ledger commits; two pairs stay open for the app
        (work / "done.json").write_text(json.dumps(part))
        assert f"imported {len(part)} verdicts" in run(".venv/bin/synpref review import done.json")
    verdicts = lake.read(VERDICTS)
    assert verdicts.height == 8 and set(verdicts["pair_id"]) == {t["data"]["pair_id"] for t in tasks[:8]}
    assert set(verdicts["annotator"]) == {"alice@x"}
    assert "ledger files: 2 -> 1" in run(".venv/bin/synpref review compact")
    assert lake.read(VERDICTS).height == 8  # compaction loses nothing

    port = free_port()
    cmd = swap(readme_line(".venv/bin/synpref review serve"), "--port 8000", f"--port {port}")
    log = tmp_path / "review.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(["bash", "-c", as_local(cmd)], cwd=work, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", [proc], log, timeout=120)
        r = httpx.get(f"http://127.0.0.1:{port}/api/next", headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()
        # one annotation per pair (overlap 0): the app hands alice one of the two pairs no import covered
        assert got["item"]["pair_id"] in {t["data"]["pair_id"] for t in tasks[8:]} and got["lease_expires_at"] > 0, got
        assert httpx.get(f"http://127.0.0.1:{port}/api/next", timeout=30).status_code == 401
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


# --- Dagster CLI and MLflow UI -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_dagster_materialize_registers_the_shards_as_written(tmp_path, env):
    """README's shell block up to `main_job`: `export SYNPREF_LLM_BACKEND=simulated` then `dagster asset materialize
    -m definitions --select synthetic_landing,synth_truth`, verbatim, from the repository root on a fresh
    DAGSTER_HOME (dagster.yaml copied as `make demo` does): both assets materialize at their defaults and the shards
    are registered as `raw_shards` partitions, the range the README's `main_job` line names."""
    import dagster as dg

    from pipelines.lake import Lake
    from pipelines.synth.generator import synthetic_shard_keys

    dh = Path(env["DAGSTER_HOME"])
    dh.mkdir(parents=True)
    (dh / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    script = readme_line("export SYNPREF_LLM_BACKEND=") + "\n" + readme_line("dagster asset materialize")
    p = sh(f"set -e\n{script}", ROOT, env, timeout=300)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    with dg.DagsterInstance.from_config(str(dh)) as inst:
        shards = inst.get_dynamic_partitions("raw_shards")
        assert shards == synthetic_shard_keys(2), shards
        for key in ("synthetic_landing", "synth_truth"):
            assert inst.get_latest_materialization_event(dg.AssetKey(key)) is not None, key
    tags = json.loads(re.search(r"--tags '(.*)'", readme_line("dagster job execute")).group(1))
    assert [tags["dagster/asset_partition_range_start"], tags["dagster/asset_partition_range_end"]] == \
        [shards[0], shards[-1]]  # the README's main_job range is exactly what was registered
    home = Path(env["SYNPREF_HOME"])
    for s in shards:
        assert (home / "landing" / s).stat().st_size > 0, s
    assert Lake(str(home / "lake")).read("synth_truth").height == 3000  # SyntheticConfig's default n_pairs


@pytest.mark.slow
@pytest.mark.integration
def test_mlflow_ui_reads_the_store_the_demo_writes(tmp_path, env):
    """README's `mlflow ui --backend-store-uri sqlite:///.synpref/mlflow/mlflow.db`, run from a directory whose
    `.synpref` is the SynPref home (as `make demo` makes it): it serves the runs the project logs there (its default
    tracking URI). `--port` is added: its default, 5000, may be taken on a shared box."""
    from mlflow.tracking import MlflowClient

    env = {**env, "SYNPREF_HOME": str(tmp_path / ".synpref")}
    p = subprocess.run([sys.executable, "-c", "from pipelines.settings import default_mlflow_uri as u; print(u())"],
                       env={**env, "PYTHONPATH": str(ROOT)}, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    uri = p.stdout.strip()
    assert uri == f"sqlite:///{(tmp_path / '.synpref' / 'mlflow' / 'mlflow.db').resolve()}", p
    (tmp_path / ".synpref" / "mlflow").mkdir(parents=True)
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("readme-mlflow", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    client.log_metric(run_id, "gold_accuracy", 0.75)
    port = free_port()
    cmd = as_local(readme_line(".venv/bin/mlflow ui")) + f" --port {port}"
    log = tmp_path / "mlflow.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(["bash", "-c", cmd], cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", [proc], log, timeout=120)
        r = httpx.get(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["run"]["data"]["metrics"][0]["value"] == 0.75
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
