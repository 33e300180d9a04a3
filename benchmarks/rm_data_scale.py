"""RM training data at scale: the token store against its peers, measured in one run.

Three figures (issue 18), each against a named peer on the same machine, same data, same cores:

1. **Build**: `build_token_store` on Ray vs HF `datasets.map` tokenizing TRL's way (one example at a time, chat
   template per conversation, `num_proc` = the same cores). Ratio = peer seconds / ours; memory = peak private
   memory (USS) of the whole process tree (driver, Ray's processes and workers / datasets' pool).
2. **Rank memory**: peak USS of each of 2 gloo ranks (torchrun) training a few steps from stores of growing size.
   The rank holds one int32 permutation per epoch (4 bytes a pair) and maps everything else; growth from the
   smallest to the largest store is the figure (the old path held ~13.6 KB a pair).
3. **Training throughput**: tokens/s training from the memory-mapped store vs from the same pairs held in memory
   (InMemoryPairs), alternating rounds, median ratio (the goal: >= 0.95x: reading the store costs nothing).

    python benchmarks/rm_data_scale.py --build 100000 --memory 100000,1000000 --tile 4000000 --throughput 10000

4. **Store size** (`--bytes N`): bytes a pair takes in the shard files, on N distinct real pairs.

Data: hh-rlhf harmless-base test pairs (../shared, real) repeated with distinct pair ids up to the size asked
(project-made synthetic pairs when ../shared is absent); a tiny Qwen3-shaped decoder's tokenizer and weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
COLS = ["pair_id", "history", "chosen", "rejected"]


class TreeUSS:
    """Peak summed USS of this process and all its descendants, sampled every `every` seconds in a thread."""

    def __init__(self, every: float = 0.25):
        import psutil

        self.proc, self.every, self.peak = psutil.Process(), every, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_full_info().uss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self._sample())

    def __enter__(self):
        self.peak = self._sample()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._sample())


def base_rows():
    import polars as pl

    if HH.exists():
        from pipelines.ingest.run import ingest_shard
        from pipelines.lake import Lake

        with tempfile.TemporaryDirectory() as d:
            lake = Lake(d)
            ingest_shard(lake, str(HH), source="hh", shard="hh/test", run_id="bench")
            return lake.read("raw_pairs").select(COLS).sort("pair_id"), "hh-rlhf harmless-base test (real)"
    from tests.rm_helpers import synth_rows

    return pl.DataFrame(synth_rows(2000, seed=3)).select(COLS), "project-made synthetic pairs (../shared absent)"


def write_pairs(path: Path, n: int, base) -> str:
    """n pairs: the base rows repeated with distinct ids, written a repeat at a time (bounded memory)."""
    import polars as pl
    import pyarrow.parquet as pq

    if path.exists():
        return str(path)
    tmp = path.with_suffix(".tmp")
    writer = None
    done, rep = 0, 0
    while done < n:
        part = base.head(n - done).with_columns(pl.col("pair_id") + f"-{rep}")
        t = part.to_arrow()
        writer = writer or pq.ParquetWriter(tmp, t.schema)
        writer.write_table(t, row_group_size=50_000)
        done += part.height
        rep += 1
    writer.close()
    os.replace(tmp, path)
    return str(path)


# --- 1. build --------------------------------------------------------------------------------------------------------
def build_ours(parquet: str, tok: str, root: str, max_len: int, cpus: int) -> dict:
    import ray

    from pipelines.rm.store import PairSource, SourceTable, build_token_store

    with TreeUSS() as mem:
        t = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        t_ray = time.perf_counter() - t
        b = build_token_store(PairSource([SourceTable(parquet)]), tok, root, max_len=max_len, parallel="ray",
                              shard_rows=max(10_000, len_of(parquet) // (4 * cpus)))
        dt = time.perf_counter() - t
        ray.shutdown()
    return {"seconds": dt, "ray_start_s": t_ray, "peak_tree_uss": mem.peak, "pairs": b.counts["pairs"],
            "tokens": b.counts["tokens"]}


def store_bytes(rows, tok: str, root: Path, max_len: int) -> dict:
    """Bytes a pair takes in the shard files of a store of `rows` (distinct pairs: no repetition to flatter it)."""
    import numpy as np

    from pipelines.rm.store import STORE_VERSION, PairSource, SourceTable, build_token_store

    root.mkdir(parents=True, exist_ok=True)
    path = root / f"pairs-{rows.height}.parquet"
    rows.write_parquet(path)
    b = build_token_store(PairSource([SourceTable(str(path))]), tok, root, max_len=max_len, parallel="inprocess")
    size = sum(f.stat().st_size for f in b.store.path.glob("shard-*.arrow"))
    n = len(b.store)
    tokens = b.store.token_counts().astype(np.int64)
    shared = tokens - b.store.row_lengths("shared_prefix").astype(np.int64)  # = shared x (sequences - 1)
    return {"pairs": n, "store_version": STORE_VERSION, "shard_bytes": size, "bytes_per_pair": size / n,
            "tokens_per_pair": float(tokens.mean()), "shared_per_pair": float(shared.mean())}


def len_of(parquet: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(parquet).metadata.num_rows


def _trl_tokenize(example: dict, tok) -> dict:
    """TRL's RewardTrainer preprocessing for conversational pairs: the chat template applied to each conversation,
    one example at a time."""
    h = list(example["history"])
    out = {}
    for side in ("chosen", "rejected"):
        msgs = h + [{"role": "assistant", "content": example[side]}]
        out[f"{side}_input_ids"] = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    return out


def build_peer(parquet: str, tok_path: str, cache: str, cpus: int) -> dict:
    from functools import partial

    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_path)
    with TreeUSS() as mem:
        t = time.perf_counter()
        ds = Dataset.from_parquet(parquet, cache_dir=cache)
        ds = ds.map(partial(_trl_tokenize, tok=tok), num_proc=cpus, remove_columns=ds.column_names,
                    load_from_cache_file=False)
        dt = time.perf_counter() - t
    n = len(ds)
    return {"seconds": dt, "peak_tree_uss": mem.peak, "pairs": n}


def tile_store(src: Path, dst: Path, copies: int) -> Path:
    """A store of `copies` x the pairs of a built one: its shard files hard-linked `copies` times and its index
    arrays repeated, so the rank-memory figure reaches sizes whose tokenizing would take this 2-core box hours.
    Every row is a real tokenized pair; pair ids repeat, which the trainer does not look at."""
    import numpy as np

    if (dst / "manifest.json").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    m = json.loads((src / "manifest.json").read_text())
    shards = []
    for c in range(copies):
        for name in m["shards"]:
            new = f"{name}-c{c:03d}"
            if not (dst / f"{new}.arrow").exists():
                os.link(src / f"{name}.arrow", dst / f"{new}.arrow")
            shards.append(new)
    off = np.load(src / "offsets.npy")
    n = int(off[-1])
    np.save(dst / "offsets.npy", np.concatenate([[0], *[(off[1:] + c * n) for c in range(copies)]]).astype(np.int64))
    for k in ("tokens", "max_seq", "shared_row"):
        a = np.load(src / f"{k}.npy", mmap_mode="r")
        out = np.lib.format.open_memmap(dst / f"{k}.npy", mode="w+", dtype=np.int32, shape=(n * copies,))
        for c in range(copies):
            out[c * n:(c + 1) * n] = a
        out.flush()
        del out
    counts = {k: v * copies for k, v in m["counts"].items()}
    per_shard = [{**r, "name": f"{r['name']}-c{c:03d}"} for c in range(copies) for r in m["per_shard"]]
    (dst / "manifest.json").write_text(json.dumps({**m, "key": f"{m['key']}-x{copies}", "shards": shards,
                                                   "per_shard": per_shard, "counts": counts,
                                                   "tiled_from": str(src)}))
    return dst


# --- 2. rank memory --------------------------------------------------------------------------------------------------
RANK_PROBE = """
import json, os, sys, threading
sys.path.insert(0, {root!r})
import psutil
from pipelines.rm.launch import load_for_training
from pipelines.rm.shards import TokenStore
from pipelines.rm.train import TrainConfig, train_reward_model
proc, peak, stop = psutil.Process(), [0], threading.Event()
def watch():
    while not stop.wait(0.05):
        peak[0] = max(peak[0], proc.memory_full_info().uss)
threading.Thread(target=watch, daemon=True).start()
store = TokenStore(sys.argv[1])
res = train_reward_model(load_for_training(sys.argv[2], "cpu", None, "false", 0), store, [], TrainConfig(batch_size=32, max_steps={steps},
                         max_len={max_len}, lr=1e-4, progress=False, save_last_every=10**9, eval_every=10**9,
                         loader_workers=0), sys.argv[3])
stop.set()
peak[0] = max(peak[0], proc.memory_full_info().uss)
print("RANK" + json.dumps({{"rank": int(os.environ.get("RANK", 0)), "uss": peak[0], "steps": res.steps}}))
"""


def rank_memory(store_path: str, tok: str, out: str, max_len: int, steps: int, probe: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(probe), store_path, tok, out], capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return sorted((json.loads(line[4:]) for line in r.stdout.splitlines() if line.startswith("RANK")),
                  key=lambda x: x["rank"])


# --- 3. throughput ---------------------------------------------------------------------------------------------------
def throughput(store_path: str, tok: str, max_len: int, steps: int, rounds: int) -> dict:
    import numpy as np

    from pipelines.rm.model import load_reward_model
    from pipelines.rm.shards import InMemoryPairs, TokenStore
    from pipelines.rm.train import TrainConfig, train_reward_model

    store = TokenStore(store_path)
    held = InMemoryPairs(store.fetch(np.arange(len(store))))
    cfg = TrainConfig(batch_size=16, max_steps=steps, max_len=max_len, lr=1e-4, progress=False, seed=0,
                      save_last_every=10**9, eval_every=10**9, loader_workers=0)
    ours, peer = [], []
    for _ in range(rounds):
        for data, acc in ((store, ours), (held, peer)):
            with tempfile.TemporaryDirectory() as out:
                acc.append(train_reward_model(load_reward_model(tok, seed=0), data, [], cfg, out).tokens_per_s)
    ratios = [a / b for a, b in zip(ours, peer)]
    return {"store_tok_s": float(np.median(ours)), "in_memory_tok_s": float(np.median(peer)),
            "ratio_median": float(np.median(ratios)), "ratios": ratios, "pairs": len(store), "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", type=int, default=100_000, help="pairs for the build comparison (0 = skip)")
    ap.add_argument("--memory", default="100000,1000000", help="store sizes for the rank-memory figure ('' = skip)")
    ap.add_argument("--tile", default="", help="further sizes, tiled from the largest built store (see tile_store)")
    ap.add_argument("--throughput", type=int, default=10_000, help="pairs for the store vs in-memory run (0 = skip)")
    ap.add_argument("--bytes", type=int, default=0, help="distinct real pairs for the store-size figure (0 = skip)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--work", default="", help="folder for data and stores (default: a temporary folder)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()

    from pipelines.rm.store import PairSource, SourceTable, build_token_store
    from pipelines.rm.tiny import build_tiny_decoder

    work = Path(a.work or tempfile.mkdtemp(prefix="rm-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    base, src = base_rows()
    tok = build_tiny_decoder(work / "tiny", "qwen3", hidden=128, layers=2)
    print(f"data: {src}, {base.height} distinct pairs repeated; max_len {a.max_len}; {a.cpus} cores", flush=True)
    res: dict = {"data": src, "max_len": a.max_len, "cpus": a.cpus}

    if a.bytes:
        res["bytes"] = store_bytes(base.head(a.bytes), tok, work / "stores-bytes", a.max_len)
        r = res["bytes"]
        print(f"store size, {r['pairs']:,} distinct pairs (format v{r['store_version']}, max_len {a.max_len}): "
              f"{r['bytes_per_pair']:,.0f} bytes a pair in shard files ({r['tokens_per_pair']:,.1f} tokens a pair "
              f"of which {r['shared_per_pair']:,.1f} a shared history; {r['shard_bytes'] / 2**20:,.2f} MB)",
              flush=True)

    if a.build:
        pq_path = write_pairs(work / f"pairs-{a.build}.parquet", a.build, base)
        peer = build_peer(pq_path, tok, tempfile.mkdtemp(dir=work, prefix="hf-cache-"), a.cpus)
        ours = build_ours(pq_path, tok, tempfile.mkdtemp(dir=work, prefix="stores-build-"), a.max_len, a.cpus)
        ratio = peer["seconds"] / ours["seconds"]
        res["build"] = {"ours": ours, "datasets_map_trl_style": peer, "speed_ratio": ratio}
        print(f"build {a.build:,} pairs: token store on Ray {ours['seconds']:.1f} s (Ray start {ours['ray_start_s']:.1f}"
              f" s included), peak tree USS {ours['peak_tree_uss'] / 2**20:,.0f} MB | HF datasets.map TRL-style "
              f"{peer['seconds']:.1f} s, peak tree USS {peer['peak_tree_uss'] / 2**20:,.0f} MB | speed {ratio:.2f}x",
              flush=True)

    if a.memory:
        probe = work / "rank_probe.py"
        probe.write_text(RANK_PROBE.format(root=str(ROOT), steps=8, max_len=a.max_len))
        res["memory"] = []
        import ray

        from pipelines.rm.shards import TokenStore

        sizes = [int(x) for x in a.memory.split(",")]
        tiles = [int(x) for x in a.tile.split(",") if x]
        built = None
        for n in sizes + tiles:
            if n in sizes:
                pq_path = write_pairs(work / f"pairs-{n}.parquet", n, base)
                ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
                b = build_token_store(PairSource([SourceTable(pq_path)]), tok, work / "stores", max_len=a.max_len,
                                      parallel="ray")
                ray.shutdown()
                store, how = b.store, f"built in {b.seconds:.0f} s"
                built = store
            else:
                copies = -(-n // len(built))
                store = TokenStore(tile_store(built.path, work / "stores" / f"tiled-{len(built)}-x{copies}", copies))
                how = f"tiled {copies}x from the {len(built):,}-pair store"
            ranks = rank_memory(str(store.path), tok, str(work / f"train-{n}"), a.max_len, 8, probe)
            row = {"pairs": len(store), "rank_uss": [r["uss"] for r in ranks], "store": how}
            res["memory"].append(row)
            print(f"rank memory, store of {len(store):,} pairs ({how}): peak USS per rank "
                  f"{', '.join(f'{u / 2**20:,.0f} MB' for u in row['rank_uss'])}", flush=True)
        res["memory_growth"] = []
        for lo, hi in zip(res["memory"], res["memory"][1:]):
            growth = max(hi["rank_uss"]) / max(lo["rank_uss"]) - 1
            res["memory_growth"].append({"from": lo["pairs"], "to": hi["pairs"], "growth": growth})
            print(f"rank memory {lo['pairs']:,} -> {hi['pairs']:,} pairs ({hi['pairs'] / lo['pairs']:.1f}x): "
                  f"{100 * growth:+.1f}% peak USS (the larger rank of each)", flush=True)

    if a.throughput:
        pq_path = write_pairs(work / f"pairs-{a.throughput}.parquet", a.throughput, base)
        b = build_token_store(PairSource([SourceTable(pq_path)]), tok, work / "stores", max_len=a.max_len,
                              parallel="inprocess")
        t = throughput(str(b.store.path), tok, a.max_len, a.steps, a.rounds)
        res["throughput"] = t
        print(f"training {t['steps']} steps: from the store {t['store_tok_s']:,.0f} tok/s | same pairs in memory "
              f"{t['in_memory_tok_s']:,.0f} tok/s | ratio median {t['ratio_median']:.3f}x over {a.rounds} rounds "
              f"({', '.join(f'{x:.3f}' for x in t['ratios'])})", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
