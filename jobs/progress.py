"""A run a person can read: one line per step as it ends (time, the counts that matter), instead of Dagster's raw
event stream. The full event log stays in the Dagster run (UI, `dagster run logs`); `--verbose` streams it."""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings

import dagster as dg

# metadata worth a glance, per step (the first ones present are shown)
KEYS = ["kept", "quarantined", "ok", "failed", "queued", "verdicts", "verified", "gold_val", "gold_test",
        "gold_val_accuracy", "gold_test_accuracy", "embedded", "pairs", "samples", "agreement_with_humans",
        "share_candidate_1", "iterations_run", "silver_size", "units_run", "units_skipped", "pool", "curated",
        "recycled", "skipped_annotation_share", "train_pairs", "models", "items", "rows"]


def quiet_libraries() -> None:
    """Silence what is noise at the default verbosity: transformers' load reports and progress bars (a new score
    head is expected to be "MISSING"), Ray's and Ray Data's progress logging and its workers' output, library
    deprecation notices. Warnings of the project's own code still show."""
    os.environ["SYNPREF_QUIET"] = "1"  # read by the compute resource: Ray workers' logs stay in /tmp/ray
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow sets its logger's level when imported
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*is currently in beta.*")
    warnings.filterwarnings("ignore", message="Found asset job named")
    # a one-process training saves its checkpoint with torch.distributed.checkpoint: expected, not a problem
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    try:
        import ray.data  # noqa: F401  (configures its loggers on import; lower them after)
    except ImportError:
        pass
    for name in ("ray", "ray.data", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray Data announces (as a warning) that the progress bars this mode turned off are off
    # (a filter on a logger sees only its own records, not its children's: it goes on the module's logger)
    logging.getLogger("ray.data._internal.progress").addFilter(
        lambda r: not r.getMessage().startswith("Progress bars disabled"))
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


class StepPrinter:
    """Follows a run's event log from a thread and prints a line per finished step."""

    def __init__(self, instance: dg.DagsterInstance, run_id: str, t0: float, every: float = 1.0):
        self.instance, self.run_id, self.t0, self.every = instance, run_id, t0, every
        self._stop = threading.Event()
        self._cursor = 0
        self._meta: dict[str, list[str]] = {}
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)
        self._drain()

    def _loop(self):
        while not self._stop.wait(self.every):
            self._drain()

    def _drain(self):
        try:
            records = self.instance.all_logs(self.run_id)
        except Exception:  # the run may not be stored yet
            return
        for rec in records[self._cursor:]:
            self._show(rec)
        self._cursor = len(records)

    def _show(self, rec) -> None:
        ev = rec.dagster_event
        if ev is None:
            return
        step = ev.step_key or ""
        clock = f"{int(time.time() - self.t0) // 60:2d}:{int(time.time() - self.t0) % 60:02d}"
        if ev.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
            mat = ev.event_specific_data.materialization
            meta = {k: v.value for k, v in mat.metadata.items()}
            shown = [f"{k} {_fmt(meta[k])}" for k in KEYS if k in meta and isinstance(meta[k], (int, float))][:6]
            if shown:
                self._meta.setdefault(step, []).append(f"{mat.asset_key.to_user_string()}: " + ", ".join(shown))
        elif ev.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            c = ev.event_specific_data
            if not c.passed:
                self._meta.setdefault(step, []).append(f"CHECK FAILED {c.check_name}")
        elif ev.event_type == dg.DagsterEventType.STEP_SUCCESS:
            secs = ev.event_specific_data.duration_ms / 1000
            detail = "; ".join(self._meta.pop(step, [])[:2])
            print(f"[synpref {clock}] done {step} ({secs:.0f}s){': ' + detail if detail else ''}", flush=True)
        elif ev.event_type == dg.DagsterEventType.STEP_FAILURE:
            err = ev.event_specific_data.error
            msg = err.message.strip().splitlines()[0] if err else ""
            print(f"[synpref {clock}] FAILED {step}: {msg}", flush=True)
