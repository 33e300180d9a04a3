"""RM training speed on GPUs: tokens/s per GPU, MFU and peak memory of each batch layout on a Qwen3-0.6B- or
1.7B-shaped random-init model in bf16, measured in one run against TRL-style batches (shuffled, each padded to its
longest member: what TRL's RewardTrainer feeds the model) through the same trainer, optimizer and step.

    python benchmarks/rm_gpu.py                                   # one GPU, in-process
    torchrun --nproc_per_node 8 benchmarks/rm_gpu.py --shape qwen3-1.7b   # data-parallel FSDP2 (NCCL), 8 GPUs
    python benchmarks/rm_gpu.py --attn flash_attention_2          # adds the padding-free `packed` layout
    python benchmarks/rm_gpu.py --attn sdpa                       # the dense-mask peer of the default flex_attention
    python benchmarks/rm_gpu.py --shape tiny --pairs 24 --max-len 256 --steps 3 --history-words 20 --response-words 10

Random init is fine for speed (DEVELOPERS.md); the text is synthetic multi-turn chat whose history and response
lengths are drawn around --history-words / --response-words. Under torchrun `--batch` is the global batch (split
over the ranks) and every figure is per GPU. MFU = 6 x non-embedding params x real tokens/s per GPU over the
chip's dense bf16 peak (H100/H200 989 TFLOP/s, A100 312; --peak-tflops for others); attention FLOPs are not
counted, so it is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12}


def synthetic_rows(n: int, history_words: int, response_words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "the a model answer question because data reward human pair train good bad why how list code".split()

    def text(mean: int) -> str:
        return " ".join(rng.choice(words) for _ in range(max(1, int(rng.lognormvariate(0, 0.5) * mean))))

    rows = []
    for i in range(n):
        turns = rng.randint(1, 3)
        hist = []
        for t in range(turns):
            hist.append({"role": "user", "content": text(history_words // (2 * turns))})
            if t < turns - 1:
                hist.append({"role": "assistant", "content": text(history_words // (2 * turns))})
        rows.append({"pair_id": f"p{i}", "history": hist, "chosen": text(response_words),
                     "rejected": text(response_words)})
    return rows


def build_model(shape: str, attn: str | None, device: str, tmp: str):
    import torch
    from transformers import AutoModelForSequenceClassification, Qwen3Config

    from pipelines.rm.model import RewardModel, ensure_pad_token
    from pipelines.rm.tiny import build_tokenizer

    tok = build_tokenizer(Path(tmp) / "tok")
    tok.pad_token = "<|endoftext|>"  # as Qwen's tokenizer: no new row, the 151,936-row embedding stays as it is
    tok.padding_side = "right"
    if shape == "qwen3-0.6b":
        dims = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                    num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                    rope_theta=1_000_000.0)
    elif shape == "qwen3-1.7b":
        dims = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                    num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                    rope_theta=1_000_000.0)
    elif shape == "tiny":
        dims = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096)
    else:
        raise SystemExit(f"unknown shape {shape}")
    cfg = Qwen3Config(**dims, tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      num_labels=1)
    torch.manual_seed(0)
    from pipelines.rm.attention import resolve_attn_implementation

    attn = resolve_attn_implementation(attn or "auto", device, decoder=True)  # as the trainer's loaders resolve it
    model = AutoModelForSequenceClassification.from_config(cfg, attn_implementation=attn)
    ensure_pad_token(model, tok)
    return RewardModel(model.to(device), tok, True, f"random-{shape}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b", help="qwen3-0.6b | qwen3-1.7b | tiny")
    ap.add_argument("--layouts", default="pairs,shared_prefix",
                    help="beside the TRL-style peer; `packed` is added by itself under flash_attention_2 (it needs "
                         "varlen kernels: under sdpa a packed row gets a dense mask over the whole batch)")
    ap.add_argument("--attn", default="auto", help="auto (the trainer's: flex_attention on GPUs without flash-attn, "
                                                   "sdpa on CPU) | sdpa | flex_attention | flash_attention_2 (adds "
                                                   "the packed layout)")
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--history-words", type=int, default=160)
    ap.add_argument("--response-words", type=int, default=80)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    import torch

    from pipelines.rm.data import Renderer, encode_pairs
    from pipelines.rm.train import TrainConfig, is_main_process, train_reward_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = a.peak_tflops * 1e12 or next((v for k, v in PEAK_BF16.items() if k in name), 0.0)
    rows = synthetic_rows(a.pairs, a.history_words, a.response_words)
    labels = {"pairs": "pairs, length-grouped", "shared_prefix": "shared_prefix", "packed": "packed (varlen)"}
    layouts = [x for x in a.layouts.split(",") if x]
    if a.attn == "flash_attention_2" and "packed" not in layouts:
        layouts.append("packed")
    runs = [("trl-style batches", "pairs", False), *((labels[x], x, True) for x in layouts)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        probe = build_model(a.shape, a.attn or None, "cpu", tmp)
        n_params = sum(p.numel() for n, p in probe.model.named_parameters() if "embed_tokens" not in n)
        enc, length = encode_pairs(Renderer(probe, a.max_len), rows)
        real = sum(p.tokens for p in enc) / max(len(enc), 1)
        del probe
        for i, (label, layout, grouped) in enumerate([runs[0], *runs]):  # the first pass warms the device up
            rm = build_model(a.shape, a.attn or None, device, tmp)
            attn = rm.model.config._attn_implementation
            cfg = TrainConfig(lr=1e-5, batch_size=a.batch, epochs=1.0, max_steps=2 if i == 0 else a.steps,
                              max_len=a.max_len, layout=layout, group_by_length=grouped, bf16="auto",
                              grad_checkpointing=a.grad_checkpointing, eval_every=10**9, save_last_every=10**9,
                              progress=False, seed=0)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            res = train_reward_model(rm, rows, [], cfg, f"{tmp}/out{i}")
            wall = time.perf_counter() - t
            if i == 0:
                continue
            tps = res.history[-1]["tokens_per_s_per_rank"]  # measured inside the loop: excludes the final save
            r = {"layout": label, "tokens_per_s_per_gpu": tps, "tokens_per_s_total": res.history[-1]["tokens_per_s"],
                 "mfu": 6 * n_params * tps / peak if peak else None,
                 "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
                 "steps": res.steps, "wall_s": wall, "final_loss": res.history[-1]["loss"]}
            results.append(r)
            del rm
            if device == "cuda":
                torch.cuda.empty_cache()
    if not is_main_process():
        return
    base = results[0]["tokens_per_s_per_gpu"]
    world = int(os.environ.get("WORLD_SIZE", 1))
    print(f"device: {name} x{world}{' (FSDP2)' if world > 1 or 'WORLD_SIZE' in os.environ else ''}; shape {a.shape} "
          f"({n_params / 1e6:.1f}M non-embedding params), attn {attn}, "
          f"{'bf16 autocast' if device == 'cuda' else 'fp32'}, batch {a.batch} "
          f"pairs, max_len {a.max_len}, {real:.0f} real tokens/pair, {length.as_dict()}")
    for r in results:
        mfu = f"MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else "MFU n/a"
        mem = f"peak {r['peak_mem_gb']:.1f} GiB" if r["peak_mem_gb"] is not None else ""
        print(f"{r['layout']:24s} {r['tokens_per_s_per_gpu']:10,.0f} tok/s/GPU ({r['tokens_per_s_total']:,.0f} in all)  "
              f"{r['tokens_per_s_per_gpu'] / base:5.2f}x vs TRL-style  "
              f"{mfu}  {mem}  loss {r['final_loss']:.3f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": name, "args": vars(a), "results": results}, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
