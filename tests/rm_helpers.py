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


def stored_copy(backbone: str, folder, dtype) -> str:
    """The same backbone saved with its weights in `dtype` (hub checkpoints of Qwen3/Llama ship bf16)."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    AutoModelForCausalLM.from_pretrained(backbone, dtype=torch.float32).to(dtype).save_pretrained(folder)
    AutoTokenizer.from_pretrained(backbone).save_pretrained(folder)
    return str(folder)


def changed_fraction(before: dict, after: dict) -> float:
    """Share of the backbone's weights (the new score head aside) that training moved."""
    n = moved = 0
    for k, v in before.items():
        if k.startswith("score"):
            continue
        n += v.numel()
        moved += int((after[k].float() != v.float()).sum())
    return moved / n
