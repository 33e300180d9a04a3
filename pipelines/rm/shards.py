"""Reading a token store (built by pipelines.rm.store): memory-mapped Arrow shards and their length index.

Kept apart from the builder so a training rank needs numpy + pyarrow only (GPU images carry no polars/deltalake).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.rm.data import Encoded, EncodedPair

STORE_SCHEMA = pa.schema([
    ("pair_id", pa.string()),
    ("chosen", pa.list_(pa.int32())),
    ("rejected", pa.list_(pa.list_(pa.int32()))),  # K >= 1 rejected responses
    ("prefix_len", pa.list_(pa.int32())),  # rendered-history tokens of chosen, then of each rejected
    ("shared", pa.int32()),  # leading tokens all sequences share (the shared-prefix layout computes them once)
    ("truncated", pa.int32()),  # history tokens the length policy removed
    ("margin", pa.float64()),  # the source's stated preference strength, null when none
])
INDEX_ARRAYS = ("tokens", "max_seq", "shared_row")


# --- reading -------------------------------------------------------------------------------------------------------
class TokenStore:
    """A built store, memory-mapped: `len`, per-pair lengths for the sampler, and `fetch(indices)` -> EncodedPairs.
    Picklable (DataLoader workers): maps are reopened in each process, never copied."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self._open()

    def _open(self) -> None:
        self.offsets = np.load(self.path / "offsets.npy")
        self._index = {k: np.load(self.path / f"{k}.npy", mmap_mode="r") for k in INDEX_ARRAYS}
        self._readers: dict[int, tuple[pa.ipc.RecordBatchFileReader, np.ndarray]] = {}

    def __getstate__(self):
        return {"path": str(self.path), "manifest": self.manifest}

    def __setstate__(self, state):
        self.path = Path(state["path"])
        self.manifest = state["manifest"]
        self._open()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def key(self) -> str:
        return self.manifest["key"]

    def row_lengths(self, layout: str) -> np.ndarray:
        return self._index[{"shared_prefix": "shared_row", "packed": "tokens"}.get(layout, "max_seq")]

    def token_counts(self) -> np.ndarray:
        return self._index["tokens"]

    def _reader(self, s: int) -> tuple[pa.ipc.RecordBatchFileReader, np.ndarray]:
        """The shard's file over a memory map and the first row of each of its record batches. Rows are read from
        their own record batch only: a `take` over the whole shard concatenates its chunks, copying the shard
        into memory (measured: ~1 GB per rank on a 4.7M-pair store)."""
        if s not in self._readers:
            reader = pa.ipc.open_file(pa.memory_map(str(self.path / f"{self.manifest['shards'][s]}.arrow"), "r"))
            per = self.manifest.get("per_shard") or []
            sizes = per[s].get("batch_rows") if s < len(per) else None
            if sizes is None or len(sizes) != reader.num_record_batches:
                # a store built before batch sizes were recorded: read each batch's header (each read maps the
                # pages around it: ~3 MB a shard of private memory, which the recorded sizes avoid)
                sizes = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
            self._readers[s] = (reader, np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]))
        return self._readers[s]

    def fetch(self, indices) -> list[EncodedPair]:
        idx = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        out: list[EncodedPair | None] = [None] * len(idx)
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            local = idx[where] - self.offsets[s]
            reader, starts = self._reader(int(s))
            batch_of = np.searchsorted(starts, local, side="right") - 1
            for b in np.unique(batch_of):
                sel = batch_of == b
                batch = reader.get_batch(int(b))
                # one-row slices (zero-copy views) rather than `take`, which reads the batch's whole buffers
                # through the map (measured: ~2.7 MB of mapped pages per call for three rows)
                rows = pa.Table.from_batches([batch.slice(int(r), 1) for r in local[sel] - starts[b]])
                for j, p in zip(where[sel], _pairs_of(rows)):
                    out[j] = p
        return out  # type: ignore[return-value]

    def __getitems__(self, micro: tuple[np.ndarray, list[float], int]) -> tuple[list[EncodedPair], list[float], int]:
        indices, weight, n_global = micro
        return self.fetch(indices), weight, n_global

    def pair_ids(self):
        """Record batches of the pair_id column, shard by shard (for the data manifest)."""
        for s in range(len(self.manifest["shards"])):
            reader, _ = self._reader(s)
            for b in range(reader.num_record_batches):
                yield reader.get_batch(b).select(["pair_id"])


def _pairs_of(t: pa.Table) -> list[EncodedPair]:
    t = t.combine_chunks()
    ch = t.column("chosen").chunk(0) if t.num_rows else None
    if ch is None:
        return []
    c_off, c_val = ch.offsets.to_numpy(), ch.values.to_numpy()
    rj = t.column("rejected").chunk(0)
    r_off, inner = rj.offsets.to_numpy(), rj.values
    i_off, i_val = inner.offsets.to_numpy(), inner.values.to_numpy()
    pf = t.column("prefix_len").chunk(0)
    p_off, p_val = pf.offsets.to_numpy(), pf.values.to_numpy()
    ids = t.column("pair_id").to_pylist()
    shared = t.column("shared").to_numpy()
    trunc = t.column("truncated").to_numpy()
    margin = t.column("margin").to_pylist()
    out = []
    for b in range(t.num_rows):
        pre = p_val[p_off[b]:p_off[b + 1]]
        tr = int(trunc[b])
        chosen = Encoded(c_val[c_off[b]:c_off[b + 1]], int(pre[0]), tr)
        rej = [Encoded(i_val[i_off[k]:i_off[k + 1]], int(pre[1 + j]), tr)
               for j, k in enumerate(range(r_off[b], r_off[b + 1]))]
        out.append(EncodedPair(ids[b], chosen, rej[0], rej[1:], margin[b], int(shared[b])))
    return out


class InMemoryPairs:
    """Encoded pairs held in this process (tests, a seed-sized set, the benchmark peer): the same interface as
    TokenStore, no files."""

    def __init__(self, pairs: list[EncodedPair]):
        self.pairs = pairs
        lens = {lay: np.array([p.row_len(lay) for p in pairs], dtype=np.int64)
                for lay in ("pairs", "shared_prefix", "packed")}
        self._lens = lens

    def __len__(self) -> int:
        return len(self.pairs)

    def row_lengths(self, layout: str) -> np.ndarray:
        return self._lens[layout if layout in self._lens else "pairs"]

    def token_counts(self) -> np.ndarray:
        return self._lens["packed"]

    def fetch(self, indices) -> list[EncodedPair]:
        return [self.pairs[int(i)] for i in indices]

    def __getitems__(self, micro):
        indices, weight, n_global = micro
        return self.fetch(indices), weight, n_global

    @property
    def key(self) -> str:
        h = hashlib.sha256()
        for p in self.pairs:
            h.update(p.pair_id.encode())
            for e in p.sequences:
                h.update(np.asarray(e.ids, dtype=np.int32).tobytes())
        return h.hexdigest()[:20]

    def pair_ids(self):
        yield pa.record_batch([pa.array([p.pair_id for p in self.pairs], pa.string())], names=["pair_id"])

