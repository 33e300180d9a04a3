"""Reading a token store (built by pipelines.rm.store): memory-mapped Arrow shards and their length index.

Kept apart from the builder so a training rank needs numpy + pyarrow only (GPU images carry no polars/deltalake).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.rm.data import Encoded, EncodedPair

STORE_SCHEMA = pa.schema([  # format 2: the shared history once per pair, each response's own tokens after it
    ("pair_id", pa.string()),
    ("prefix", pa.list_(pa.int32())),  # the `shared` leading tokens every sequence of the pair starts with
    ("chosen", pa.list_(pa.int32())),  # chosen's tokens after the shared prefix
    ("rejected", pa.list_(pa.list_(pa.int32()))),  # K >= 1 rejected responses' tokens after the shared prefix
    ("prefix_len", pa.list_(pa.int32())),  # rendered-history tokens of chosen, then of each rejected
    ("shared", pa.int32()),  # = len(prefix) (the shared-prefix layout computes them once)
    ("truncated", pa.int32()),  # history tokens the length policy removed
    ("margin", pa.float64()),  # the source's stated preference strength, null when none
])
# format 1 (stores built before the history was kept once): chosen/rejected hold whole sequences. Still read.
STORE_SCHEMA_V1 = pa.schema([f for f in STORE_SCHEMA if f.name != "prefix"])
INDEX_ARRAYS = ("tokens", "max_seq", "shared_row")
OPEN_SHARDS = 64  # shard files a reader keeps open (and mapped) at once, least recently used closed first


# --- reading -------------------------------------------------------------------------------------------------------
class TokenStore:
    """A built store, memory-mapped: `len`, per-pair lengths for the sampler, and `fetch(indices)` -> EncodedPairs.
    Picklable (DataLoader workers): maps are reopened in each process, never copied.

    At most `max_open` shard files are open at once (an LRU): a 40M-pair store has ~800 shards and every loader
    worker of every rank reads all of them, which would otherwise hold ~800 descriptors per worker against the
    process's open-file limit. Closing a shard's file leaves the pairs already fetched from it valid: Arrow keeps a
    mapping alive while any buffer of it is referenced and unmaps it when the last one is dropped."""

    def __init__(self, path: str | Path, max_open: int = OPEN_SHARDS):
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.path = Path(path)
        self.max_open = max_open
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self._open()

    def _open(self) -> None:
        self.offsets = np.load(self.path / "offsets.npy")
        self._index = {k: np.load(self.path / f"{k}.npy", mmap_mode="r") for k in INDEX_ARRAYS}
        self._readers: OrderedDict[int, tuple[pa.MemoryMappedFile, pa.ipc.RecordBatchFileReader, np.ndarray]] = \
            OrderedDict()

    def __getstate__(self):
        return {"path": str(self.path), "manifest": self.manifest, "max_open": self.max_open}

    def __setstate__(self, state):
        self.path = Path(state["path"])
        self.manifest = state["manifest"]
        self.max_open = state.get("max_open", OPEN_SHARDS)
        self._open()

    def close(self) -> None:
        """Close every open shard file (pairs already fetched stay valid)."""
        while self._readers:
            self._readers.popitem(last=False)[1][0].close()

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
        if s in self._readers:
            self._readers.move_to_end(s)
        else:
            while len(self._readers) >= self.max_open:
                self._readers.popitem(last=False)[1][0].close()
            source = pa.memory_map(str(self.path / f"{self.manifest['shards'][s]}.arrow"), "r")
            reader = pa.ipc.open_file(source)
            per = self.manifest.get("per_shard") or []
            sizes = per[s].get("batch_rows") if s < len(per) else None
            if sizes is None or len(sizes) != reader.num_record_batches:
                # a store built before batch sizes were recorded: read each batch's header (each read maps the
                # pages around it: ~3 MB a shard of private memory, which the recorded sizes avoid)
                sizes = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
            self._readers[s] = (source, reader, np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]))
        return self._readers[s][1:]

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

    def __getitems__(self, micro: tuple) -> tuple:
        """(indices, weights, *rest) from the batch sampler -> (pairs, weights, *rest) for the collator."""
        indices, weight, *rest = micro
        return (self.fetch(indices), weight, *rest)

    def pair_ids(self):
        """Record batches of the pair_id column, shard by shard (for the data manifest)."""
        for s in range(len(self.manifest["shards"])):
            reader, _ = self._reader(s)
            for b in range(reader.num_record_batches):
                yield reader.get_batch(b).select(["pair_id"])


def _pairs_of(t: pa.Table) -> list[EncodedPair]:
    """EncodedPairs of some rows of either format. Format 2 rows join the shared prefix to each response (one copy
    of a few hundred int32s a sequence, which collation makes anyway); format 1 rows are zero-copy views."""
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
    if "prefix" in t.column_names:
        sp = t.column("prefix").chunk(0)
        s_off, s_val = sp.offsets.to_numpy(), sp.values.to_numpy()

        def seq(b, tail):
            return np.concatenate([s_val[s_off[b]:s_off[b + 1]], tail])
    else:
        def seq(b, tail):
            return tail
    ids = t.column("pair_id").to_pylist()
    shared = t.column("shared").to_numpy()
    trunc = t.column("truncated").to_numpy()
    margin = t.column("margin").to_pylist()
    out = []
    for b in range(t.num_rows):
        pre = p_val[p_off[b]:p_off[b + 1]]
        tr = int(trunc[b])
        chosen = Encoded(seq(b, c_val[c_off[b]:c_off[b + 1]]), int(pre[0]), tr)
        rej = [Encoded(seq(b, i_val[i_off[k]:i_off[k + 1]]), int(pre[1 + j]), tr)
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
        indices, weight, *rest = micro
        return (self.fetch(indices), weight, *rest)

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

