"""RM training throughput and accuracy: SynPref's trainer vs TRL's RewardTrainer, same run, same everything.

Same backbone and initial weights (seeded head), same token ids (both get the SynPref renderer's output; TRL
takes pre-tokenized `chosen_ids`/`rejected_ids`), same max length, batch size, LR, schedule, epochs, machine.
Throughput = real (non-pad) tokens of chosen+rejected per second of training; accuracy = held-out pairwise
accuracy scored through the same scorer.

    python benchmarks/rm_train.py                       # MiniLM + a small Qwen3-shaped decoder, hh-rlhf if present
    python benchmarks/rm_train.py --backbones minilm --train 400 --test 200 --rounds 5

The two trainers alternate in rounds (ours, TRL, ours, TRL, ... on the same batches from the same initial
weights) and the reported ratio is the median over rounds, so a burst of background load hits both sides of a
round alike and one bad round does not move the figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def load_rows(n_train: int, n_test: int) -> tuple[list[dict], list[dict], str]:
    from pipelines.ingest.run import ingest_shard
    from pipelines.lake import Lake

    if HH.exists():
        with tempfile.TemporaryDirectory() as d:
            lake = Lake(d)
            ingest_shard(lake, str(HH), source="hh", shard="hh/test", run_id="bench")
            rows = sorted(lake.read("raw_pairs").to_dicts(), key=lambda r: r["pair_id"])
        src = "hh-rlhf harmless-base test (real)"
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from tests.rm_helpers import synth_rows

        rows = synth_rows(n_train + n_test, seed=11)
        src = "project-made synthetic pairs (../shared absent)"
    return rows[:n_train], rows[-n_test:], src


def backbone(name: str, tmp: str) -> str:
    from pipelines.rm.tiny import build_tiny_decoder
    from pipelines.settings import minilm_path

    if name == "minilm":
        return minilm_path()
    if name == "decoder":  # Qwen3-shaped, random init: throughput only (accuracy near chance for both sides)
        return build_tiny_decoder(Path(tmp) / "dec", "qwen3", hidden=256, layers=4)
    return name


def run_ours(path: str, train: list[dict], cfg) -> tuple[float, str, int]:
    from pipelines.rm.model import load_reward_model
    from pipelines.rm.train import train_reward_model

    rm = load_reward_model(path, seed=0)
    out = tempfile.mkdtemp()
    t = time.perf_counter()
    res = train_reward_model(rm, train, [], cfg, out)
    return time.perf_counter() - t, res.best_dir, res.steps


def run_trl(path: str, encoded, cfg) -> tuple[float, str]:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from pipelines.rm.model import load_reward_model, save_reward_model

    rm = load_reward_model(path, seed=0)
    ds = Dataset.from_list([{"chosen_ids": e.chosen.ids, "rejected_ids": e.rejected.ids} for e in encoded])
    out = tempfile.mkdtemp()
    steps = -(-len(encoded) // cfg.batch_size) * cfg.epochs
    args = RewardConfig(output_dir=out, per_device_train_batch_size=cfg.batch_size, num_train_epochs=cfg.epochs,
                        learning_rate=cfg.lr, lr_scheduler_type="constant_with_warmup",
                        warmup_steps=int(cfg.warmup_ratio * steps),
                        max_length=cfg.max_len, gradient_checkpointing=False, report_to=[], logging_steps=10_000,
                        save_strategy="no", bf16=False, use_cpu=True, seed=cfg.seed, dataloader_num_workers=0,
                        disable_tqdm=True, max_grad_norm=1.0, weight_decay=0.0)
    trainer = RewardTrainer(model=rm.model, args=args, train_dataset=ds, processing_class=rm.tokenizer)
    t = time.perf_counter()
    trainer.train()
    dt = time.perf_counter() - t
    save_reward_model(rm, out + "/final")
    return dt, out + "/final"


def accuracy(path: str, test: list[dict], max_len: int) -> float:
    from pipelines.rm.model import load_reward_model
    from pipelines.rm.score import score_rows

    s, _ = score_rows(load_reward_model(path), test, "bench", max_len=max_len)
    return float((s["margin"] > 0).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", default="minilm,decoder")
    ap.add_argument("--train", type=int, default=640)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--layout", default="auto", help="auto | pairs | shared_prefix | packed (SynPref side)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating ours/TRL rounds; the median ratio is reported")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    import numpy as np
    import torch

    from pipelines.rm.data import Renderer, encode_pairs
    from pipelines.rm.model import load_reward_model
    from pipelines.rm.train import TrainConfig

    train, test, src = load_rows(a.train, a.test)
    print(f"data: {src}; train {len(train)} pairs, test {len(test)}; torch threads {torch.get_num_threads()}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.backbones.split(","):
            path = backbone(name, tmp)
            cfg = TrainConfig(lr=5e-5 if name == "minilm" else 3e-4, batch_size=a.batch, epochs=1.0,
                              max_len=a.max_len, eval_every=10**9, progress=False, seed=0, layout=a.layout)
            enc, _ = encode_pairs(Renderer(load_reward_model(path), a.max_len), train)
            tokens = sum(e.tokens for e in enc)
            ratios, t_o, t_t = [], [], []
            for _ in range(a.rounds):
                t_ours, d_ours, steps = run_ours(path, train, cfg)
                t_trl, d_trl = run_trl(path, enc, cfg)
                ratios.append(t_trl / t_ours)
                t_o.append(t_ours)
                t_t.append(t_trl)
            acc_ours, acc_trl = accuracy(d_ours, test, a.max_len), accuracy(d_trl, test, a.max_len)
            med = float(np.median(ratios))
            r = {"backbone": name, "pairs": len(enc), "tokens": tokens, "steps": steps, "rounds": a.rounds,
                 "synpref_tok_s": tokens / float(np.median(t_o)), "trl_tok_s": tokens / float(np.median(t_t)),
                 "speedup_median": med, "speedups": ratios, "synpref_acc": acc_ours, "trl_acc": acc_trl}
            results.append(r)
            print(f"{name:8s} synpref {r['synpref_tok_s']:8,.0f} tok/s acc {acc_ours:.3f} | TRL RewardTrainer "
                  f"{r['trl_tok_s']:8,.0f} tok/s acc {acc_trl:.3f} | speed ratio median {med:.2f}x over {a.rounds} "
                  f"rounds ({', '.join(f'{x:.2f}' for x in ratios)}), accuracy delta {100 * (acc_ours - acc_trl):+.1f} pt",
                  flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
