"""The canonical preference pair: one schema every stage reads and writes.

A pair is (history, chosen, rejected): `history` is every earlier turn as a list of {role, content} messages,
`chosen`/`rejected` are the two candidate final assistant turns. `pair_id` is the paper's global dedup key
(App. C.1): a hash of the normalized (history, chosen, rejected) triple, so the same pair from two sources gets
the same id and re-ingesting a source changes nothing.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

ROLES = ("system", "user", "assistant", "tool")


class LabelOrigin(str, enum.Enum):
    """Who decided which response is `chosen`."""

    DATASET = "dataset"  # the source dataset's own label
    HUMAN = "human"  # a human verdict in the review ledger
    LLM = "llm"  # an LLM judge ensemble
    RM = "rm"  # a reward model
    SIMULATED = "simulated"  # the offline simulated reviewer/judge (demo only)


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass
class PreferencePair:
    history: list[Message]
    chosen: str
    rejected: str
    source: str
    source_row: int
    shard: str = ""
    label_origin: LabelOrigin = LabelOrigin.DATASET
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def pair_id(self) -> str:
        return pair_id([m.as_dict() for m in self.history], self.chosen, self.rejected)


_WS = re.compile(r"[ \t\r\f\v]+")


def normalize_text(text: str) -> str:
    """NFC, unified newlines, collapsed runs of spaces, stripped ends: formatting noise must not split a pair."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n")
    return _WS.sub(" ", text).strip()


def pair_id(history: list[dict[str, str]], chosen: str, rejected: str) -> str:
    """Stable 128-bit id of the normalized (history, chosen, rejected) triple (hex)."""
    key = json.dumps(
        [[(m["role"], normalize_text(m["content"])) for m in history], normalize_text(chosen), normalize_text(rejected)],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).hexdigest()


def prompt_text(history: list[dict[str, str]]) -> str:
    """The conversation as plain text (used for embeddings, decontamination and display)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in history)


def first_user_turn(history: list[dict[str, str]]) -> str:
    for m in history:
        if m["role"] == "user":
            return m["content"]
    return ""


MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

RAW_PAIRS_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("history", pa.list_(MESSAGE_TYPE)),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("source", pa.string()),
        ("shard", pa.string()),
        ("source_row", pa.int64()),
        ("label_origin", pa.string()),
        ("category_hint", pa.string()),  # a category the source itself states (may be null)
        ("ingest_run_id", pa.string()),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("shard", pa.string()),
        ("source_row", pa.int64()),
        ("stage", pa.string()),  # which stage refused it: ingest, decontaminate, annotate, ...
        ("reason", pa.string()),  # a reason code, see pipelines.ingest.checks.Reason
        ("detail", pa.string()),
        ("payload", pa.string()),  # the raw row as JSON, so nothing is lost
        ("pair_id", pa.string()),  # when one could be computed
        ("run_id", pa.string()),
        ("quarantined_at", pa.timestamp("us", tz="UTC")),
    ]
)

DUPLICATES_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("shard", pa.string()),
        ("source_row", pa.int64()),
        ("pair_id", pa.string()),
        ("kept_source", pa.string()),
        ("kept_shard", pa.string()),
        ("kept_source_row", pa.int64()),
        ("run_id", pa.string()),
    ]
)
