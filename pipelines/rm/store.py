"""The token store: training pairs tokenized once, in parallel, into memory-mapped Arrow shards that every rank
reads its own share of.

Why Arrow IPC files (Feather v2, uncompressed) rather than Parquet or MosaicML MDS: an IPC file maps into memory
as is, so a rank reads row i of a 26M-pair store with no decoding and no copy, and pages it never touches are never
read (Parquet must decode whole pages; its compression stands between disk and tensor). It is the format HF
`datasets` memory-maps, it is already a dependency (pyarrow), and `list<int32>` columns slice straight into numpy.
MDS brings remote streaming and its own shard-aware shuffles, but our sampler groups pairs by length across the
whole set and splits each global batch by tokens, which MDS's samplers do not do; used only as a file format it
would add a dependency and a decoding step for nothing. Stores live on a filesystem every rank can map: a node's
disk, or the shared filesystem of a cluster (docs/deployment.md).

Layout of a store folder `<root>/<key>/`:
- `shard-00000.arrow` ... : one row per pair (STORE_SCHEMA), written by one build task each, in input order; the
  pair's shared history (`prefix`) is stored once and each response after it (format 2; format-1 stores, whole
  sequences per response, are still read);
- `shard-00000.json`: the shard's counts, written last (the shard's completion marker: a rebuild skips it);
- `tokens.npy`, `max_seq.npy`, `shared_row.npy` (int32, one entry per pair) and `offsets.npy` (first row of each
  shard): what the sampler groups and balances by, memory-mapped;
- `manifest.json`: the key's inputs, counts (read, held out, refused, truncated, written) and build time; written
  last, so a store with a manifest is complete and is reused as is.

The key is a hash of (input table versions or file identities, held-out set, tokenizer, chat template, max_len,
length policy, STORE_VERSION): a second training with the same key reuses the shards; anything that changes the
ids changes the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import pyarrow as pa

from pipelines.rm.data import EncodedPair, LengthPolicy, Renderer, encode_rows
from pipelines.rm.model import RMTokenizer, load_tokenizer
from pipelines.rm.shards import INDEX_ARRAYS, STORE_SCHEMA, InMemoryPairs, TokenStore

__all__ = ["INDEX_ARRAYS", "STORE_SCHEMA", "InMemoryPairs", "TokenStore", "PairSource", "SourceTable",
           "build_token_store", "choose_parallel", "StoreBuild", "canonical_pairs", "detect_layout", "store_key"]

# bump when the rendering rules or the shard layout change: old stores are then not reused (a new key), but still
# read (TokenStore reads format 1 shards, whole sequences, and format 2, the shared history once)
STORE_VERSION = 2
SHARD_ROWS = 50_000  # target pairs per shard (one build task each)
ENCODE_ROWS = 1_024  # pairs tokenized and written per record batch (bounds a task's memory)
AUTO_RAY_TASKS = 2  # `parallel=auto` uses an available Ray from this many build tasks on
TASK_ROWS = SHARD_ROWS  # input rows a build task holds at once: larger row groups are read in row ranges
READ_BATCH = 8_192  # rows decoded at a time when reading a row range out of a larger row group

LAYOUTS = ("canonical", "trl", "trl_prompt", "best_of_n", "ultrafeedback")


# --- where pairs come from ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceTable:
    """One input: a Delta table at a pinned version, or Parquet file(s) (a file or a folder), local or s3://.

    layout: `canonical` (pair_id?, history, chosen, rejected, margin?, rejected_more?), `trl` (chosen/rejected as
    whole conversations: message lists sharing every turn but the last) or `trl_prompt` (prompt + chosen/rejected,
    strings or message lists). `where`: a polars filter applied to every piece."""

    uri: str
    version: int | None = None
    storage_options: dict = field(default_factory=dict)
    where: pl.Expr | None = None
    layout: str = "canonical"

    def dataset(self):
        import pyarrow.dataset as ds

        if self.version is not None:
            from deltalake import DeltaTable

            dt = DeltaTable(self.uri, version=self.version, storage_options=self.storage_options or None)
            if "deletionVectors" in (dt.protocol().reader_features or []):
                raise ValueError(f"{self.uri} uses deletion vectors: its files alone do not say which rows are live")
            return dt.to_pyarrow_dataset()
        fs, path = _filesystem(self.uri)
        return ds.dataset(path, format="parquet", filesystem=fs)

    def identity(self) -> dict:
        where = self.where.meta.serialize(format="json") if self.where is not None else None
        if self.version is not None:
            return {"delta": self.uri, "version": self.version, "where": where, "layout": self.layout}
        fs, path = _filesystem(self.uri)
        files = self.dataset().files
        infos = [fs.get_file_info(f) for f in files] if fs is not None else [None] * len(files)
        ident = []
        for f, inf in zip(files, infos):
            if inf is not None:
                ident.append([f, inf.size, inf.mtime_ns])
            else:
                st = os.stat(f)
                ident.append([f, st.st_size, st.st_mtime_ns])
        return {"parquet": self.uri, "files": ident, "where": where, "layout": self.layout}


def _filesystem(uri: str):
    """(pyarrow filesystem or None for local, path) for a Parquet location."""
    if uri.startswith("s3://"):
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        from pipelines.ingest.readers import fs_options

        return PyFileSystem(FSSpecHandler(fsspec.filesystem("s3", **fs_options(uri)))), uri[len("s3://"):]
    return None, uri


@dataclass(frozen=True)
class Piece:
    """Rows [start, start + rows) of one row group of one file of one input: the unit a build task reads. A row
    group larger than a task's row budget (writers default to 1M-row groups) is cut into several pieces, so no
    task holds more than that many input rows at once."""

    table: int
    path: str
    row_groups: tuple[int, ...]
    rows: int
    start: int = 0  # first row within the row group
    whole: bool = True  # the piece is its whole row group (read at once, as before the split)


@dataclass
class PairSource:
    """Training pairs: the inputs, and the comparisons to hold out (a Parquet file with a `comparison_id` column:
    every gold_val / gold_test comparison, in either orientation)."""

    tables: list[SourceTable]
    exclude: str | None = None

    def identity(self) -> dict:
        ex = None
        if self.exclude:
            ex = hashlib.sha256(Path(self.exclude).read_bytes()).hexdigest()
        return {"tables": [t.identity() for t in self.tables], "exclude": ex}

    def pieces(self, task_rows: int = TASK_ROWS) -> list[Piece]:
        """Every row group of every input in a fixed order, cut into pieces of at most `task_rows` rows."""
        if task_rows < 1:
            raise ValueError(f"task_rows must be >= 1, got {task_rows}")
        out = []
        for ti, t in enumerate(self.tables):
            frags = sorted(t.dataset().get_fragments(), key=lambda f: f.path)
            for f in frags:
                for rg in f.split_by_row_group():
                    n, rid = rg.row_groups[0].num_rows, rg.row_groups[0].id
                    if n <= task_rows:
                        if n:
                            out.append(Piece(ti, f.path, (rid,), n))
                        continue
                    for s in range(0, n, task_rows):
                        out.append(Piece(ti, f.path, (rid,), min(task_rows, n - s), s, whole=False))
        return out


def detect_layout(columns: dict[str, pl.DataType]) -> str:
    """Which input layout a table is in, from the columns it needs (extra columns are ignored)."""
    def is_msgs(c):
        return isinstance(columns.get(c), pl.List) and isinstance(columns[c].inner, pl.Struct)

    if {"history", "chosen", "rejected"} <= set(columns) and columns["chosen"] == pl.String:
        return "canonical"
    if {"instruction", "completions"} <= set(columns):
        return "ultrafeedback"
    if {"prompt", "chosen", "rejected"} <= set(columns) and columns["rejected"] == pl.List(pl.String):
        return "best_of_n"  # rejected is a list of texts: one chosen against several (RewardBench-2-style)
    if {"prompt", "chosen", "rejected"} <= set(columns):
        return "trl_prompt"
    if is_msgs("chosen") and is_msgs("rejected"):
        return "trl"
    raise ValueError("training pairs need history/chosen/rejected, TRL's chosen/rejected conversations (with or "
                     "without `prompt`), prompt + chosen + rejected (a list: best-of-N), or UltraFeedback's "
                     f"instruction + completions; found columns {sorted(columns)}")


def _multi_response(df: pl.DataFrame, layout: str) -> pl.DataFrame:
    """One row per prompt with several responses -> chosen, rejected, rejected_more (the K-negative and listwise
    losses read them), margin. UltraFeedback: completions ranked by their score (overall_score, else the mean of
    the annotations' ratings, as ingest scores them); chosen = the unique best, rejected = the next lower score,
    rejected_more = every other strictly worse one, margin = the best's score minus the rejected one's. A row
    without a unique best and a worse one is refused with its reason. best_of_n: chosen (a text or a list of
    one) against every text of `rejected`."""
    from pipelines.ingest.formats import _completion_score

    rows = []
    if layout == "ultrafeedback":
        for i, instruction, completions in df.select("_row", "instruction", "completions").iter_rows():
            scored = sorted(((s, c["response"]) for c in (completions or []) if isinstance(c, dict)
                             and isinstance(c.get("response"), str) and (s := _completion_score(c)) is not None),
                            key=lambda x: -x[0])
            why = None
            if len(scored) < 2 or scored[0][0] == scored[-1][0]:
                why = "fewer than two completions with different scores"
            elif scored[0][0] == scored[1][0]:
                why = "no unique best completion (tied top scores)"
            hist = [{"role": "user", "content": instruction}] if isinstance(instruction, str) else None
            rows.append({"_row": i, "history": hist, "chosen": None if why else scored[0][1],
                         "rejected": None if why else scored[1][1],
                         "rejected_more": [] if why else [r for _, r in scored[2:]],
                         "margin": None if why else float(scored[0][0] - scored[1][0]), "_why": why})
    else:
        for i, prompt, chosen, rejected in df.select("_row", "prompt", "chosen", "rejected").iter_rows():
            chosen = chosen if isinstance(chosen, str) or chosen is None else (chosen[0] if len(chosen) == 1 else None)
            why = None if chosen is not None else "chosen must be one text"
            rej = [r for r in (rejected or []) if r is not None]
            if not rej:
                why = why or "no rejected text"
            rows.append({"_row": i, "history": [{"role": "user", "content": prompt}] if isinstance(prompt, str)
                         else None, "chosen": chosen, "rejected": rej[0] if rej else None,
                         "rejected_more": rej[1:], "margin": None, "_why": why})
    msg = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
    return pl.DataFrame(rows, schema={"_row": pl.UInt32, "history": msg, "chosen": pl.String, "rejected": pl.String,
                                      "rejected_more": pl.List(pl.String), "margin": pl.Float64, "_why": pl.String})


def canonical_pairs(df: pl.DataFrame, layout: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(pairs in the canonical columns with a pair_id, refused rows as {payload, reason}). TRL conversations become
    history = every turn but the last, chosen/rejected = the last turn's text; the two conversations must share
    that history. A row with a missing text is refused, never guessed."""
    msg = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
    extra = [c for c in ("margin", "rejected_more") if c in df.columns]
    df = df.with_row_index("_row")
    if layout == "canonical":
        out = df.select("_row", *[c for c in ("pair_id", "history", "chosen", "rejected") if c in df.columns], *extra)
        out = out.with_columns(_why=pl.lit(None, pl.String))
    elif layout == "trl":
        c, r = pl.col("chosen").cast(msg), pl.col("rejected").cast(msg)
        out = df.select("_row", *extra, history=c.list.slice(0, c.list.len() - 1), _rh=r.list.slice(0, r.list.len() - 1),
                        chosen=c.list.last().struct.field("content"),
                        rejected=r.list.last().struct.field("content"))
        out = out.with_columns(_why=pl.when(pl.col("history") != pl.col("_rh"))
                               .then(pl.lit("chosen and rejected conversations differ before their last turn"))
                               .otherwise(None)).drop("_rh")
    elif layout == "trl_prompt":
        prompt = (pl.concat_list(pl.struct(role=pl.lit("user"), content=pl.col("prompt")))
                  if df.schema["prompt"] == pl.String else pl.col("prompt").cast(msg))
        sides = {k: (pl.col(k) if df.schema[k] == pl.String else pl.col(k).cast(msg).list.last().struct.field("content"))
                 for k in ("chosen", "rejected")}
        out = df.select("_row", *extra, history=prompt, **sides).with_columns(_why=pl.lit(None, pl.String))
    elif layout in ("best_of_n", "ultrafeedback"):
        out = _multi_response(df, layout)
    else:
        raise ValueError(f"unknown layout {layout!r}: one of {LAYOUTS}")
    missing = pl.any_horizontal(pl.col("history").is_null(), pl.col("chosen").is_null(), pl.col("rejected").is_null())
    out = out.with_columns(_why=pl.when(pl.col("_why").is_null() & missing).then(pl.lit("a text is missing"))
                           .otherwise(pl.col("_why")))
    bad = out.filter(pl.col("_why").is_not_null()).select("_row", reason="_why")
    good = out.filter(pl.col("_why").is_null()).drop("_why", "_row")
    if "pair_id" not in good.columns:
        from pipelines.schema import pair_ids

        good = good.with_columns(pair_id=pair_ids(good))
    refused = df.join(bad, on="_row").select(payload=pl.struct(pl.exclude("_row", "reason")).struct.json_encode(),
                                             reason="reason") if bad.height else pl.DataFrame(
        schema={"payload": pl.String, "reason": pl.String})
    return good, refused


# --- building ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardTask:
    out: str  # store folder
    name: str  # shard-00000
    pieces: tuple[Piece, ...]
    tables: tuple[SourceTable, ...]
    exclude: str | None
    tokenizer: str
    max_len: int
    policy: str


def _read_piece(p: Piece, t: SourceTable, fragments: dict) -> pl.DataFrame:
    if p.table not in fragments:  # one listing per input and task
        fragments[p.table] = {f.path: f for f in t.dataset().get_fragments()}
    frag = fragments[p.table][p.path].subset(row_group_ids=list(p.row_groups))
    if p.whole:
        tbl = frag.to_table()
    else:
        tbl = _row_range(frag, p.start, p.start + p.rows)
    df = pl.from_arrow(tbl)
    if t.where is not None:
        df = df.filter(t.where)
    return df


def _row_range(frag, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a one-row-group fragment, streamed READ_BATCH rows at a time through a buffered
    stream: the rows before `start` are decoded and dropped (Parquet cannot seek inside a row group without a page
    index), never held, so the task's memory is its own rows plus one batch. Measured on a 500k-row group of
    hh-rlhf pairs: the last 50k rows add 117 MB of peak RSS, the whole group 824 MB (and the dataset scanner,
    even asked for small batches, ~640 MB: it reads the group's column chunks whole)."""
    import pyarrow.parquet as pq

    rg = frag.row_groups[0].id
    kept, pos = [], 0
    with frag.open() as f:
        pf = pq.ParquetFile(f, buffer_size=1 << 20, pre_buffer=False)
        for b in pf.iter_batches(batch_size=READ_BATCH, row_groups=[rg], use_threads=False):
            lo, hi = max(start - pos, 0), min(stop - pos, b.num_rows)
            if hi > lo:
                kept.append(b.slice(lo, hi - lo))
            pos += b.num_rows
            if pos >= stop:
                break
        schema = pf.schema_arrow
    if pos < stop:
        raise ValueError(f"{frag.path}: row group {rg} ended at row {pos}, before {stop}")
    return pa.Table.from_batches(kept, schema=schema)


def build_shard(task: ShardTask) -> dict:
    """Tokenize one shard's pieces into `<name>.arrow` (+ its index arrays), counts into `<name>.json` last.
    Idempotent: a shard whose json exists and names the same pieces is returned as is (one left by a build that
    cut the input differently, e.g. an interrupted build resumed with another shard or task size, is rebuilt)."""
    out = Path(task.out)
    marker = out / f"{task.name}.json"
    pieces = [[p.table, p.path, list(p.row_groups), p.start, p.rows] for p in task.pieces]
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("pieces") == pieces:
            return done
        (out / f"{task.name}.refused.parquet").unlink(missing_ok=True)  # the stale shard's, if any
    t0 = time.perf_counter()
    renderer = Renderer(load_tokenizer(task.tokenizer), task.max_len, LengthPolicy(task.policy))
    exclude = pl.read_parquet(task.exclude, columns=["comparison_id"]) if task.exclude else None
    counts = {"rows": 0, "invalid": 0, "held_out": 0, "refused": 0, "truncated": 0, "pairs": 0, "tokens": 0,
              "multi_rejected": 0}
    refused: list[pl.DataFrame] = []
    idx = {k: [] for k in INDEX_ARRAYS}
    tmp = out / f".{task.name}.{uuid.uuid4().hex}.arrow"
    datasets: dict = {}
    batch_rows: list[int] = []  # rows of each record batch, in file order: readers locate a row without a scan
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, STORE_SCHEMA) as writer:
        for p in task.pieces:
            t = task.tables[p.table]
            raw = _read_piece(p, t, datasets)
            counts["rows"] += raw.height
            df, bad = canonical_pairs(raw, t.layout)
            counts["invalid"] += bad.height
            refused.append(bad)
            if exclude is not None and df.height:
                from pipelines.schema import comparison_ids

                df = df.with_columns(comparison_id=comparison_ids(df))
                kept = df.join(exclude, on="comparison_id", how="anti", maintain_order="left")
                counts["held_out"] += df.height - kept.height
                df = kept
            for s in range(0, df.height, ENCODE_ROWS):
                rows = df.slice(s, ENCODE_ROWS).to_dicts()  # bounded: ENCODE_ROWS pairs at a time
                enc, rep = encode_rows(renderer, rows)
                counts["refused"] += rep.dropped
                counts["truncated"] += rep.truncated
                if rep.dropped_ids:
                    refused.append(df.slice(s, ENCODE_ROWS).filter(pl.col("pair_id").is_in(rep.dropped_ids)).select(
                        payload=pl.struct(pl.all()).struct.json_encode(),
                        reason=pl.lit(f"over_length: a response alone exceeds max_len {task.max_len}")))
                kept = [e for e in enc if e is not None]
                counts["multi_rejected"] += sum(1 for e in kept if e.more)
                batch = _record_batch(kept, idx)
                counts["pairs"] += batch.num_rows
                if batch.num_rows:
                    writer.write_batch(batch)
                    batch_rows.append(batch.num_rows)
    os.replace(tmp, out / f"{task.name}.arrow")
    arrays = {k: np.concatenate(v).astype(np.int32) if v else np.zeros(0, np.int32) for k, v in idx.items()}
    np.savez(out / f"{task.name}.idx.npz", **arrays)
    counts["tokens"] = int(arrays["tokens"].astype(np.int64).sum())
    refused = [r for r in refused if r.height]
    if refused:  # nothing is lost: every refused row with its reason
        pl.concat(refused).write_parquet(out / f"{task.name}.refused.parquet")
    res = {"name": task.name, **counts, "batch_rows": batch_rows, "pieces": pieces,
           "seconds": round(time.perf_counter() - t0, 3)}
    tmpj = out / f".{task.name}.json.tmp"
    tmpj.write_text(json.dumps(res))
    os.replace(tmpj, marker)
    return res


def _record_batch(pairs: list[EncodedPair], idx: dict[str, list]) -> pa.RecordBatch:
    """Format 2: the pair's shared prefix once, then each response's tokens after it (the history is most of a
    multi-turn pair: stored once rather than once per response)."""
    shared = [p.shared for p in pairs]
    prefix = [list(p.chosen.ids[:k]) for p, k in zip(pairs, shared)]
    chosen = [list(p.chosen.ids[k:]) for p, k in zip(pairs, shared)]
    rejected = [[list(e.ids[k:]) for e in p.rejected_all] for p, k in zip(pairs, shared)]
    prefix_len = [[e.prefix_len for e in p.sequences] for p in pairs]
    tokens = np.array([p.tokens for p in pairs], dtype=np.int64)
    n_seq = np.array([len(p.sequences) for p in pairs], dtype=np.int64)
    idx["tokens"].append(tokens)
    idx["max_seq"].append(np.array([max(len(e.ids) for e in p.sequences) for p in pairs], dtype=np.int64))
    idx["shared_row"].append(tokens - np.asarray(shared, dtype=np.int64) * (n_seq - 1))
    return pa.RecordBatch.from_arrays([
        pa.array([p.pair_id for p in pairs], pa.string()),
        pa.array(prefix, pa.list_(pa.int32())),
        pa.array(chosen, pa.list_(pa.int32())),
        pa.array(rejected, pa.list_(pa.list_(pa.int32()))),
        pa.array(prefix_len, pa.list_(pa.int32())),
        pa.array(shared, pa.int32()),
        pa.array([p.chosen.truncated for p in pairs], pa.int32()),
        pa.array([p.margin for p in pairs], pa.float64()),
    ], schema=STORE_SCHEMA)


def tokenizer_fingerprint(tok: RMTokenizer) -> str:
    """What decides the ids: the tokenizer's full definition (vocab, merges, normalizer, post-processor, added
    tokens), its special tokens and chat template, and whether it is rendered as a decoder."""
    t = tok.tokenizer
    h = hashlib.sha256()
    backend = getattr(t, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary files
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            for f in sorted(t.save_vocabulary(d)):
                h.update(Path(f).read_bytes())
    h.update(json.dumps([type(t).__name__, t.special_tokens_map, t.chat_template, tok.is_decoder, t.padding_side],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def store_key(source: PairSource, tok: RMTokenizer, max_len: int, policy: str) -> tuple[str, dict]:
    ident = {"store_version": STORE_VERSION, "inputs": source.identity(), "tokenizer": tokenizer_fingerprint(tok),
             "chat_template": tok.tokenizer.chat_template, "max_len": max_len, "length_policy": policy}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20], ident


def _build_shard_on_one_cpu(task: ShardTask) -> dict:
    """A Ray task holds one CPU: the tokenizer's own thread pool would only contend with the other tasks."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return build_shard(task)


def _run_tasks(tasks: list[ShardTask], parallel: str, progress: Callable[[int, int], None] | None) -> list[dict]:
    """Every task's result, in task order: on Ray (one CPU a task; a local Ray or the cluster the step attached
    to) when `parallel` is ray, or here one after another."""
    if parallel == "ray":
        import ray

        remote = ray.remote(num_cpus=1, max_retries=2)(_build_shard_on_one_cpu)
        refs = [remote.remote(t) for t in tasks]
        pending, done = list(refs), 0
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            done += len(ready)
            if progress:
                progress(done, len(tasks))
        return ray.get(refs)
    out = []
    for i, t in enumerate(tasks):
        out.append(build_shard(t))
        if progress:
            progress(i + 1, len(tasks))
    return out


def choose_parallel(parallel: str, tasks: int) -> tuple[str, bool]:
    """(ray | inprocess, whether this call connected to Ray). `auto` picks Ray when a cluster is at hand (this
    process is already connected to one, or SYNPREF_RAY_ADDRESS names one: `auto`, ray://head:10001, or `local`
    for a fresh local Ray) and the input is large (at least AUTO_RAY_TASKS build tasks, i.e. more than one shard's
    rows: one task gains nothing from a cluster), else builds here. `ray` uses the connected Ray, or connects to
    SYNPREF_RAY_ADDRESS, or starts a local one."""
    if parallel not in ("auto", "ray", "inprocess"):
        raise ValueError(f"parallel must be auto, ray or inprocess, got {parallel!r}")
    if parallel == "inprocess" or (parallel == "auto" and tasks < AUTO_RAY_TASKS):
        return "inprocess", False
    address = os.environ.get("SYNPREF_RAY_ADDRESS") or None
    try:
        import ray
    except ImportError:
        if parallel == "ray":
            raise
        return "inprocess", False
    if ray.is_initialized():
        return "ray", False
    if parallel == "auto" and address is None:
        return "inprocess", False
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    return "ray", True


@dataclass
class StoreBuild:
    store: "TokenStore"
    key: str
    reused: bool
    counts: dict
    seconds: float


def build_token_store(source: PairSource, tokenizer: str, root: str | Path, *, max_len: int, policy: str = "truncate",
                      shard_rows: int = SHARD_ROWS, task_rows: int = TASK_ROWS, parallel: str = "auto",
                      progress: Callable[[int, int], None] | None = None) -> StoreBuild:
    """The token store of `source` under `tokenizer` (a model folder or hub id) at (`max_len`, `policy`): reused
    when its key exists, else built (shards already written by an interrupted build are kept). `parallel`: ray |
    inprocess | auto (see `choose_parallel`: Ray when one is connected or SYNPREF_RAY_ADDRESS names one and there
    are several build tasks). `task_rows`: the most input rows one task holds (larger row groups are read in row
    ranges)."""
    t0 = time.perf_counter()
    tok = load_tokenizer(tokenizer)
    LengthPolicy(policy)
    key, ident = store_key(source, tok, max_len, policy)
    path = Path(root) / key
    if (path / "manifest.json").exists():
        return StoreBuild(TokenStore(path), key, True, TokenStore(path).manifest["counts"], time.perf_counter() - t0)
    path.mkdir(parents=True, exist_ok=True)
    groups, cur, n = [], [], 0
    for p in source.pieces(min(task_rows, shard_rows)):  # consecutive pieces up to shard_rows pairs a shard; deterministic order
        if cur and n + p.rows > shard_rows:
            groups.append(cur)
            cur, n = [], 0
        cur.append(p)
        n += p.rows
    if cur:
        groups.append(cur)
    tasks = [ShardTask(str(path), f"shard-{i:05d}", tuple(g), tuple(source.tables), source.exclude, tokenizer,
                       max_len, policy) for i, g in enumerate(groups)]
    parallel, attached = choose_parallel(parallel, len(tasks))
    try:
        results = _run_tasks(tasks, parallel, progress)
    finally:
        if attached:  # this build connected to the cluster: disconnect (a Ray someone else started stays up)
            import ray

            ray.shutdown()
    counts = {k: sum(r[k] for r in results) for k in ("rows", "invalid", "held_out", "refused", "truncated", "pairs",
                                                        "tokens", "multi_rejected")}
    if counts["pairs"] == 0:
        raise ValueError(f"no trainable pairs: {counts}")
    # the global index, shard by shard into memory-mapped outputs (bounded memory at any size)
    offsets = np.zeros(len(results) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([r["pairs"] for r in results])
    outs = {k: np.lib.format.open_memmap(path / f".{k}.npy.tmp", mode="w+", dtype=np.int32, shape=(counts["pairs"],))
            for k in INDEX_ARRAYS}
    for i, r in enumerate(results):
        with np.load(path / f"{r['name']}.idx.npz") as z:
            for k in INDEX_ARRAYS:
                outs[k][offsets[i]:offsets[i + 1]] = z[k]
    for k, arr in outs.items():
        arr.flush()
        del arr
        os.replace(path / f".{k}.npy.tmp", path / f"{k}.npy")
    np.save(path / "offsets.npy", offsets)
    manifest = {"key": key, "identity": ident, "counts": counts, "shards": [r["name"] for r in results],
                "per_shard": results, "tokenizer": tokenizer, "max_len": max_len, "length_policy": policy,
                "built_seconds": round(time.perf_counter() - t0, 3), "parallel": parallel}
    tmp = path / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, default=str))
    os.replace(tmp, path / "manifest.json")
    return StoreBuild(TokenStore(path), key, False, counts, time.perf_counter() - t0)


