"""The dedup index of `raw_pairs`, persisted on the lake and updated per committed shard.

Why: every ingest run used to rebuild `IdIndex` by scanning every pair id of the lake, so a shard's cost grew
with the lake (and a sensor launching one run per shard paid that scan per shard). Here the index lives next to
the table as sorted, column-per-file segments (`<lake>/_index/raw_pairs/seg-N/{hi,lo,place,row}.npy`, 28 bytes
a pair) plus a manifest naming the Delta version of `raw_pairs` they describe. A run memory-maps the segments
(on a local lake), so a probe touches O(k log N) pages for k new ids instead of reading N: per-shard cost stays
flat as the lake grows. Segments are merged geometrically (a newer segment at least half its elder's size is
merged into it), so there are O(log N) of them and each id is rewritten O(log N) times in all.

Why it stays correct: the manifest is trusted only when its version is exactly the table's current version.
Any write it did not see (an interrupted run that appended rows but never reached `commit`, a row written
behind ingest's back, an OPTIMIZE) makes the versions differ, and the next run rebuilds the index from one
full scan and persists it: the cost of a lake-sized scan is paid once per such event, never per shard. Writers
are serialized by the `ingest` Dagster pool, as for the table itself.

On a remote (s3://) lake the segments are read whole rather than mapped: still 28 bytes a pair of binary,
not a Delta scan of the id strings, but linear in N.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from pipelines.ingest.readers import fs_options
from pipelines.ingest.run import RAW, IdIndex, load_id_index
from pipelines.lake import Lake

COLUMNS = ("hi", "lo", "place", "row")
MANIFEST = "manifest.json"


@dataclass
class IdStore:
    """Open (or rebuild) the persisted index of `table`; `commit` it after each shard's rows are written."""

    lake: Lake
    table: str = RAW
    rebuilt: bool = field(default=False, init=False)  # whether the last `open` had to scan the table

    @property
    def base(self) -> str:
        return f"{self.lake.root}/_index/{self.table}"

    def _fs(self) -> Any:
        fs, _, _ = fsspec.get_fs_token_paths(self.base, storage_options=fs_options(self.base))
        return fs

    def manifest(self) -> dict[str, Any] | None:
        fs = self._fs()
        path = f"{self.base}/{MANIFEST}"
        if not fs.exists(path):
            return None
        return json.loads(fs.cat(path))

    def open(self) -> IdIndex:
        """The index as of the table's current version: the persisted one when it is current, else one scan."""
        version = self.lake.version(self.table)
        m = self.manifest()
        current = m is not None and m["version"] == version
        self.rebuilt = version is not None and not current
        if current:
            index = IdIndex()
            for source, shard in m["places"]:
                index.place(source, shard)
            index.frozen = [self._load(s["name"]) for s in m["segments"]]
            index.frozen_duplicates = int(m["duplicates"])
            return index
        if version is None:
            return IdIndex()
        index = load_id_index(self.lake)
        self.commit(index, version)
        return index

    def commit(self, index: IdIndex, version: int | None) -> None:
        """Persist the keys `index` gained since `open` as a segment describing table version `version`."""
        if version is None:
            return
        m = self.manifest() or {"version": None, "segments": [], "next": 0}
        if m["version"] == version and not index.chunks:
            return  # nothing was written (a rerun): the persisted index is already current
        duplicates = index.duplicate_keys()
        segments = [dict(s) for s in m["segments"]] if index.frozen else []
        nxt = int(m["next"])
        stale: list[str] = [s["name"] for s in m["segments"] if s not in segments]
        if index.chunks:
            cols = [np.concatenate([c[i] for c in index.chunks]) for i in range(4)]
            name, nxt = f"seg-{nxt:06d}", nxt + 1
            self._write(name, cols)
            segments.append({"name": name, "n": int(cols[0].size)})
            while len(segments) >= 2 and segments[-2]["n"] <= 2 * segments[-1]["n"]:
                b, a = segments.pop(), segments.pop()
                merged = [np.concatenate([x, y]) for x, y in zip(self._load(a["name"]), self._load(b["name"]))]
                name, nxt = f"seg-{nxt:06d}", nxt + 1
                self._write(name, merged)
                segments.append({"name": name, "n": int(merged[0].size)})
                stale += [a["name"], b["name"]]
        self._write_manifest({"version": version, "segments": segments, "next": nxt, "duplicates": duplicates,
                              "places": [list(p) for p in index.places]})
        fs = self._fs()
        for name in stale:  # only after the manifest stopped naming them
            if fs.exists(f"{self.base}/{name}"):
                fs.rm(f"{self.base}/{name}", recursive=True)
        index.frozen = [self._load(s["name"]) for s in segments]
        index.frozen_duplicates = duplicates
        index.chunks = []

    # --- files ---------------------------------------------------------------------------------------------
    def _write(self, name: str, cols: list[np.ndarray]) -> None:
        o = np.argsort(cols[0], kind="stable")
        dtypes = (np.uint64, np.uint64, np.int32, np.int64)
        fs = self._fs()
        fs.makedirs(f"{self.base}/{name}", exist_ok=True)
        for col, arr, dt in zip(COLUMNS, cols, dtypes):
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(arr[o], dtype=dt))
            fs.pipe(f"{self.base}/{name}/{col}.npy", buf.getvalue())

    def _load(self, name: str) -> tuple[np.ndarray, ...]:
        if not self.lake.is_remote:  # memory-mapped: a probe reads the pages it touches, not the segment
            return tuple(np.load(f"{self._local_base()}/{name}/{c}.npy", mmap_mode="r") for c in COLUMNS)
        fs = self._fs()
        return tuple(np.load(io.BytesIO(fs.cat(f"{self.base}/{name}/{c}.npy"))) for c in COLUMNS)

    def _local_base(self) -> str:
        return self.base.removeprefix("file://")

    def _write_manifest(self, m: dict[str, Any]) -> None:
        data = json.dumps(m).encode()
        if self.lake.is_remote:  # one PUT: readers see the old manifest or the new one
            self._fs().pipe(f"{self.base}/{MANIFEST}", data)
            return
        tmp = f"{self._local_base()}/{MANIFEST}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, f"{self._local_base()}/{MANIFEST}")
