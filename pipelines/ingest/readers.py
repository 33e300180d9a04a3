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


def _fs_options(path: str) -> dict[str, Any]:
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


def _jsonl_batch(lines: list[bytes], start: int) -> Batch:
    """Try the whole batch as one NDJSON table (fast, native); fall back to line-by-line decoding on any error."""
    if all(line.strip() for line in lines):
        try:
            frame = pl.read_ndjson(io.BytesIO(b"".join(lines)), infer_schema_length=None)
            if frame.height == len(lines):
                return Batch(start, frame=frame)
        except Exception:  # noqa: BLE001 - any parse problem means: decode line by line and quarantine the bad ones
            pass
    return Batch(start, records=_decode_lines(lines, start))


def iter_jsonl(path: str, batch_size: int = 50_000, chunk_bytes: int = 1 << 26) -> Iterator[Batch]:
    """Batches of about `batch_size` lines, cut from ~64 MB byte chunks at line ends (no per-line Python on the
    clean path: a chunk that parses as NDJSON in one call is one batch)."""
    start = 0
    rest = b""
    with fsspec.open(path, "rb", compression="infer", **_fs_options(path)) as fh:
        while True:
            block = fh.read(chunk_bytes)
            data = rest + block
            if not block:
                if data and not data.endswith(b"\n"):
                    data += b"\n"
                rest = b""
            else:
                cut = data.rfind(b"\n") + 1
                rest, data = data[cut:], data[:cut]
            # split on \n only (bytes.splitlines would also cut at a stray \r and shift row numbers)
            lines = [ln + b"\n" for ln in data[:-1].split(b"\n")] if data else []
            for i in range(0, len(lines), batch_size):
                part = lines[i:i + batch_size]
                yield _jsonl_batch(part, start)
                start += len(part)
            if not block:
                return


def iter_parquet(path: str, batch_size: int = 50_000) -> Iterator[Batch]:
    with fsspec.open(path, "rb", **_fs_options(path)) as fh:
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


def iter_records(path: str, batch_size: int = 50_000) -> Iterator[list[RawRecord]]:
    for b in iter_batches(path, batch_size):
        yield b.as_records()
