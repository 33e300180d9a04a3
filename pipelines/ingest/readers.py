"""Streaming readers: a path (local, s3://, hf://) -> batches of (row index, raw record | decode error).

Readers never hold a whole source in memory: JSONL is read line by line through fsspec (gzip/zstd inferred
from the name), Parquet record batch by record batch through pyarrow. Turning a raw record into canonical pairs
is the job of `formats`; this module only decodes bytes.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import numpy as np
import polars as pl
import pyarrow.parquet as pq

from pipelines.lake import s3_storage_options_from_env


@dataclass
class RawRecord:
    row: int
    record: dict[str, Any] | None  # None when the row could not be decoded
    error: str | None = None  # decode error detail
    payload: str | None = None  # the undecodable text, kept for the quarantine


@dataclass
class Batch:
    """Rows [start, start + n) of a file: as a frame when the bytes parse cleanly as a table, else records."""

    start: int
    frame: pl.DataFrame | None = None
    records: list[RawRecord] | None = None

    def __len__(self) -> int:
        return self.frame.height if self.frame is not None else len(self.records or [])

    def as_records(self) -> list[RawRecord]:
        if self.records is None:
            assert self.frame is not None
            self.records = [RawRecord(self.start + i, r) for i, r in enumerate(self.frame.to_dicts())]
        return self.records


def fs_options(path: str) -> dict[str, Any]:
    if path.startswith("s3://"):
        o = s3_storage_options_from_env()
        kw: dict[str, Any] = {}
        if "AWS_ACCESS_KEY_ID" in o:
            kw["key"] = o["AWS_ACCESS_KEY_ID"]
            kw["secret"] = o.get("AWS_SECRET_ACCESS_KEY")
        client: dict[str, Any] = {}
        if "AWS_ENDPOINT_URL" in o:
            client["endpoint_url"] = o["AWS_ENDPOINT_URL"]
        if "AWS_REGION" in o:
            client["region_name"] = o["AWS_REGION"]
        if client:
            kw["client_kwargs"] = client
        return kw
    return {}


def file_kind(path: str) -> str:
    name = path.lower()
    for ext in (".gz", ".zst", ".bz2", ".xz"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    raise ValueError(f"cannot tell the file type of {path!r}: expected .jsonl[.gz], .json or .parquet")


def _decode_lines(lines: list[bytes], start: int) -> list[RawRecord]:
    out = []
    for j, line in enumerate(lines):
        i = start + j
        if not line.strip():
            out.append(RawRecord(i, None, "empty line", ""))
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            out.append(RawRecord(i, None, f"invalid utf-8: {e}", line.decode("utf-8", "replace")))
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            out.append(RawRecord(i, None, f"invalid JSON: {e}", text))
            continue
        if isinstance(rec, dict):
            out.append(RawRecord(i, rec))
        else:
            out.append(RawRecord(i, None, "row is not a JSON object", text))
    return out


def _jsonl_batch(data: bytes, ends: np.ndarray, start: int) -> Batch:
    """Lines `data` (ending at the byte offsets `ends`, each a \\n) as one NDJSON table when every line starts an
    object (so no blank line can be skipped by the parser and shift the rows) and the table has one row a line;
    otherwise line-by-line decoding, which quarantines the bad ones."""
    heads = np.frombuffer(data, np.uint8)[np.concatenate(([0], ends[:-1] + 1))]
    if (heads == ord("{")).all():
        try:
            frame = pl.read_ndjson(io.BytesIO(data), infer_schema_length=None)
            if frame.height == len(ends):
                return Batch(start, frame=frame)
        except Exception:  # noqa: BLE001 - any parse problem means: decode line by line and quarantine the bad ones
            pass
    return Batch(start, records=_decode_lines([ln + b"\n" for ln in data[:-1].split(b"\n")], start))


def _fill(fh, buf: np.ndarray, at: int) -> int:
    """Read into buf[at:] until it is full or the file ends (a decompressor may return less than asked)."""
    view = memoryview(buf)
    try:
        n = at
        while n < len(buf):
            got = fh.readinto(view[n:])
            if not got:
                break
            n += got
        return n
    finally:
        view.release()


def iter_jsonl(path: str, batch_size: int = 50_000, chunk_bytes: int = 1 << 26) -> Iterator[Batch]:
    """Batches of about `batch_size` lines, cut from ~64 MB byte chunks at line ends. The clean path has no
    per-line Python: line ends are found with numpy and a batch is a byte slice parsed as NDJSON in one call (at
    tens of millions of rows, splitting into Python lines and joining them back cost as much as the parse).

    The file is read into one reused, uninitialized buffer (a line cut by a chunk's end is moved to its front;
    a small file touches only its own size of it), and the newline mask reuses one array, so a batch costs one
    copy (the bytes handed to the parser): fresh 64 MB objects per chunk cost three copies and a page fault
    every 4 KB, which was half the reader's time."""
    start = 0
    buf = np.empty(chunk_bytes, dtype=np.uint8)
    mask = np.empty(chunk_bytes, dtype=bool)
    carried = 0  # bytes at the front of buf: the unfinished last line of the previous chunk
    with fsspec.open(path, "rb", compression="infer", **fs_options(path)) as fh:
        while True:
            if carried == len(buf):  # one line longer than the buffer: grow it
                buf = np.concatenate([buf, np.empty(len(buf), dtype=np.uint8)])
                mask = np.empty(len(buf), dtype=bool)
            end = _fill(fh, buf, carried)
            eof = end < len(buf)
            if eof and end and buf[end - 1] != ord("\n"):  # an unterminated last line
                buf[end] = ord("\n")  # end < len(buf) here: there is room
                end += 1
            # lines end at \n only (a stray \r stays inside its line, as row numbers must not shift)
            ends = np.flatnonzero(np.equal(buf[:end], ord("\n"), out=mask[:end]))
            for i in range(0, len(ends), batch_size):
                part = ends[i:i + batch_size]
                lo = int(ends[i - 1]) + 1 if i else 0
                yield _jsonl_batch(buf[lo:int(part[-1]) + 1].tobytes(), part - lo, start)
                start += len(part)
            cut = int(ends[-1]) + 1 if len(ends) else 0
            carried = end - cut
            buf[:carried] = buf[cut:end].copy()  # the unfinished line to the front (a copy of that line only)
            if eof:
                return


def read_ahead(batches: Iterator[Batch]) -> Iterator[Batch]:
    """The next batch is read and parsed on a thread while the caller works on this one (the NDJSON parse and
    the Parquet decode release the GIL: on 2 cores ingest parses and hashes at once). One batch ahead, no more."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as ex:
        nxt = ex.submit(next, batches, None)
        while (batch := nxt.result()) is not None:
            nxt = ex.submit(next, batches, None)
            yield batch


def iter_parquet(path: str, batch_size: int = 50_000) -> Iterator[Batch]:
    with fsspec.open(path, "rb", **fs_options(path)) as fh:
        pf = pq.ParquetFile(fh)
        row = 0
        for rb in pf.iter_batches(batch_size=batch_size):
            frame = pl.from_arrow(rb)
            assert isinstance(frame, pl.DataFrame)
            yield Batch(row, frame=frame)
            row += frame.height


def iter_batches(path: str, batch_size: int = 50_000) -> Iterator[Batch]:
    if file_kind(path) == "parquet":
        yield from iter_parquet(path, batch_size)
    else:
        yield from iter_jsonl(path, batch_size)

