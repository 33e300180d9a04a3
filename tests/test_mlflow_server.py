"""RM runs tracked on a real `mlflow server` over HTTP (what a team shares), not only the embedded SQLite store:
params, per-step metrics, the HF folder as an artifact served by the server, a registered version that loads back
in plain transformers with the same scores."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.servers import free_port, stop, wait_http



@pytest.mark.slow
def test_train_and_register_against_an_mlflow_tracking_server(tmp_path, lake):
    from transformers import AutoModelForSequenceClassification

    from pipelines.rm.model import load_reward_model
    from pipelines.rm.registry import train_and_register
    from pipelines.rm.score import score_texts
    from pipelines.rm.tiny import build_tiny_decoder
    from pipelines.rm.tracking import download_model
    from pipelines.rm.train import TrainConfig, train_reward_model
    from tests.rm_helpers import synth_rows

    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(tmp_path / "mlflow.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
                               "--artifacts-destination", str(tmp_path / "artifacts")],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", [server], tmp_path / "mlflow.log", timeout=120)
        backbone = build_tiny_decoder(tmp_path / "tiny", "qwen3")
        rows = synth_rows(24, seed=2)
        cfg = TrainConfig(lr=2e-3, batch_size=8, epochs=2, max_len=128, eval_every=2, progress=False)

        def train_fn(b, tr, va, c, out, log_fn):
            return train_reward_model(load_reward_model(b), tr, va, c, out, log=log_fn)

        reg = train_and_register(lake, tracking_uri=uri, experiment="synpref-test", name="synpref-test-rm",
                                 role="gold", backbone=backbone, train=rows[:16], val_rows=rows[16:], cfg=cfg,
                                 out_dir=str(tmp_path / "out"), train_fn=train_fn)
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(uri)
        client = MlflowClient()
        run = client.get_run(reg.mlflow_run_id)
        assert run.data.params["train.lr"] == "0.002" and "best_val_accuracy" in run.data.metrics
        assert len(client.get_metric_history(reg.mlflow_run_id, "loss")) == reg.result.steps
        assert reg.rm_version == "synpref-test-rm:1"
        # the registered version is served by the tracking server and loads in plain transformers
        folder = download_model(uri, "synpref-test-rm", dst=str(tmp_path / "dl"))
        assert (Path(folder) / "config.json").exists() and not str(folder).startswith(str(tmp_path / "out"))
        hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        assert hf.config.num_labels == 1
        convs = [(r["history"], r["chosen"]) for r in rows[:3]]
        ours = score_texts(load_reward_model(reg.path), convs)
        theirs = score_texts(load_reward_model(folder), convs)
        assert torch.allclose(torch.tensor(ours), torch.tensor(theirs), atol=1e-5)
    finally:
        stop([server])
