"""Streaming readers: a path (local, s3://, hf://) -> batches of (row index, raw record | decode error).

Readers never hold a whole source in memory: JSONL is read line by line through fsspec (gzip/zstd inferred
from the name), Parquet record batch by record batch through pyarrow. Turning a raw record into canonical pairs
is the job of `formats`; this module only decodes bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import pyarrow.parquet as pq

from pipelines.lake import s3_storage_options_from_env


@dataclass
class RawRecord:
    row: int
    record: dict[str, Any] | None  # None when the row could not be decoded
    error: str | None = None  # decode error detail
    payload: str | None = None  # the undecodable text, kept for the quarantine


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


def iter_jsonl(path: str, batch_size: int = 50_000) -> Iterator[list[RawRecord]]:
    batch: list[RawRecord] = []
    with fsspec.open(path, "rb", compression="infer", **_fs_options(path)) as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                batch.append(RawRecord(i, None, "empty_line", ""))
            else:
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    batch.append(RawRecord(i, None, f"invalid utf-8: {e}", line.decode("utf-8", "replace")))
                else:
                    try:
                        rec = json.loads(text)
                    except json.JSONDecodeError as e:
                        batch.append(RawRecord(i, None, f"invalid JSON: {e}", text))
                    else:
                        if isinstance(rec, dict):
                            batch.append(RawRecord(i, rec))
                        else:
                            batch.append(RawRecord(i, None, "row is not a JSON object", text))
            if len(batch) >= batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def iter_parquet(path: str, batch_size: int = 50_000) -> Iterator[list[RawRecord]]:
    with fsspec.open(path, "rb", **_fs_options(path)) as fh:
        pf = pq.ParquetFile(fh)
        row = 0
        for rb in pf.iter_batches(batch_size=batch_size):
            recs = rb.to_pylist()
            yield [RawRecord(row + j, r) for j, r in enumerate(recs)]
            row += len(recs)


def iter_records(path: str, batch_size: int = 50_000) -> Iterator[list[RawRecord]]:
    kind = file_kind(path)
    if kind == "parquet":
        yield from iter_parquet(path, batch_size)
    else:
        yield from iter_jsonl(path, batch_size)
