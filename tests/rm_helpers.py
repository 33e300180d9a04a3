"""Shared helpers for RM tests: pairs from the project's synthetic generator, tiny decoder folders."""

from pipelines.schema import pair_id
from pipelines.synth.generator import generate


def synth_rows(n: int, seed: int = 0, noise: float = 0.0, categories=None):
    rows = []
    for rec, _ in generate(n, seed=seed, label_noise=noise, categories=categories):
        h = [{"role": "user", "content": rec["prompt"]}]
        rows.append({"pair_id": pair_id(h, rec["chosen"], rec["rejected"]), "history": h, "chosen": rec["chosen"],
                     "rejected": rec["rejected"], "category": rec["category"]})
    return rows
