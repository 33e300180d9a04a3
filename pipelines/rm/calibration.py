"""Reward calibration stored with the weights: the mean and std of an RM's rewards on its selection set (gold_val).

Bradley-Terry rewards are defined up to a shift (and, across models, a scale): a PPO/GRPO trainer that mixes or
compares RMs, or clips rewards, wants them on a known scale. The trainer already scores every response of the
selection set when it picks the best checkpoint, so it records their mean and std next to that checkpoint
(`synpref_calibration.json`), registration logs them to MLflow, and the reward server's `scores` are
(reward - mean) / std. No temperature is fitted: the BT margin is already a log-odds, and a temperature fitted on
gold_val would need a held-out set of its own to be reported honestly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

CALIBRATION_FILE = "synpref_calibration.json"


@dataclass(frozen=True)
class Calibration:
    mean: float = 0.0
    std: float = 1.0
    n: int = 0
    source: str = "none"

    def __call__(self, reward: float) -> float:
        return (reward - self.mean) / self.std

    @classmethod
    def of_folder(cls, folder: str | Path) -> "Calibration":
        """The folder's calibration, or the identity when it has none (a model trained elsewhere)."""
        f = Path(folder) / CALIBRATION_FILE
        if not f.is_file():
            return cls()
        d = json.loads(f.read_text())
        return cls(float(d["mean"]), float(d["std"]) or 1.0, int(d.get("n", 0)), str(d.get("source", f.name)))

    def write(self, folder: str | Path) -> dict:
        d = {"mean": self.mean, "std": self.std, "n": self.n, "source": self.source}
        (Path(folder) / CALIBRATION_FILE).write_text(json.dumps(d, indent=2))
        return d


def from_sums(total: float, total_sq: float, n: int, source: str) -> Calibration:
    """From a reward sum, sum of squares and count (what ranks all-reduce): sample std, 1 when degenerate."""
    if n == 0:
        return Calibration(source=source)
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0) * n / max(n - 1, 1)
    return Calibration(mean, math.sqrt(var) or 1.0, n, source)


def calibrate(folder: str | Path, rewards: list[float], source: str) -> dict:
    """Mean and std of `rewards` (a held-out set's), written into `folder`."""
    return from_sums(sum(rewards), sum(r * r for r in rewards), len(rewards), source).write(folder)
