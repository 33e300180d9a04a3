"""Memory per micro-batch against row length: FlexAttention BlockMasks vs the dense masks (issue 32.2).

One shared-prefix row of L tokens (history L/2, a chosen and a rejected response of L/4 each) on the tiny Qwen3 of
pipelines/rm/tiny.py, collated as the trainer collates it (pipelines.rm.collate) and scored by the trainer's
`forward` (pipelines.rm.train) under `sdpa` (the peer: the dense [B, 1, L, L] additive mask built on the device from
the segment ids, what every non-flex kernel needs) and under `flex_attention` (a BlockMask from the same ids).
Each (kernel, L) runs in a fresh process: peak USS above the process's baseline while collating and scoring,
sampled every 10 ms, and tokens/s of the forward after one warm-up (FlexAttention compiles on first use).

On CPU this is forward only: FlexAttention has no CPU backward (torch raises), so training on CPU stays on sdpa,
and the training-step figures wait for a GPU (benchmarks/rm_gpu.py picks flex_attention by default there).

    python benchmarks/attention_memory.py                          # L = 4096, 8192, 16384
    python benchmarks/attention_memory.py --lengths 1024,2048 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(backbone: str, impl: str, L: int, repeats: int) -> dict:
    import torch

    from benchmarks.rm_data_scale import TreeUSS
    from pipelines.rm.collate import collate_shared_prefix
    from pipelines.rm.data import Encoded, EncodedPair
    from pipelines.rm.model import load_reward_model
    from pipelines.rm.train import forward

    torch.set_num_threads(2)
    rm = load_reward_model(backbone, attn_implementation=impl)
    rm.model.eval()
    vocab = rm.model.config.vocab_size - 1
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    h, r = L // 2, L // 4
    hist = ids(h)
    pair = EncodedPair("p", Encoded(hist + ids(r), h), Encoded(hist + ids(r), h))

    def step() -> float:
        t = time.perf_counter()
        b = collate_shared_prefix([pair], rm.tokenizer.pad_token_id)
        with torch.no_grad():
            forward(rm, b)
        return time.perf_counter() - t

    step()  # warm-up: FlexAttention compiles its kernel for this shape
    with TreeUSS(every=0.01) as mem:
        base = mem.peak
        secs = min(step() for _ in range(repeats))
    b = collate_shared_prefix([pair], rm.tokenizer.pad_token_id)
    collated = sum(t.numel() * t.element_size() for t in [*b.inputs.values(), b.segment, b.reads])
    return {"attn": impl, "row_tokens": L, "peak_uss_mb": round((mem.peak - base) / 2**20, 1),
            "tokens_per_s": round(L / secs), "collated_bytes": collated}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # backbone|impl|L: one measurement (in a fresh process)
    a = ap.parse_args()
    if a.one:
        backbone, impl, L = a.one.split("|")
        print(json.dumps(one(backbone, impl, int(L), a.repeats)))
        return
    from pipelines.rm.tiny import build_tiny_decoder

    with tempfile.TemporaryDirectory() as tmp:
        backbone = build_tiny_decoder(Path(tmp) / "qwen3")
        rows = []
        for L in (int(x) for x in a.lengths.split(",")):
            got = {}
            for impl in ("sdpa", "flex_attention"):
                out = subprocess.run([sys.executable, __file__, "--one", f"{backbone}|{impl}|{L}", "--repeats",
                                      str(a.repeats)], capture_output=True, text=True, check=True, cwd=str(ROOT))
                got[impl] = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(got[impl])
            s, f = got["sdpa"], got["flex_attention"]
            print(f"L={L:>6,}: peak USS sdpa (dense mask) {s['peak_uss_mb']:8.1f} MB | flex_attention "
                  f"{f['peak_uss_mb']:8.1f} MB | ratio {s['peak_uss_mb'] / max(f['peak_uss_mb'], 0.1):5.1f}x | "
                  f"tokens/s sdpa {s['tokens_per_s']:,} flex {f['tokens_per_s']:,} | collated batch "
                  f"{f['collated_bytes'] / 1024:.0f} KiB (a [1, L, L] bool pattern: {L * L / 2**20:.0f} MiB)",
                  flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
