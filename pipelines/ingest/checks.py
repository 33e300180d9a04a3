"""Structural checks on a canonical candidate, with the reason codes quarantine rows carry."""

from __future__ import annotations

import enum


class Reason(str, enum.Enum):
    UNDECODABLE = "undecodable"  # not UTF-8, not JSON, not an object
    MISSING_FIELD = "missing_field"
    NULL_FIELD = "null_field"
    MALFORMED = "malformed"  # wrong types, unknown roles, no turns
    HISTORY_MISMATCH = "history_mismatch"  # chosen/rejected disagree before the final turn
    EMPTY_TEXT = "empty_text"
    IDENTICAL = "identical_responses"
    BAD_TEXT = "bad_text"  # NUL bytes or U+FFFD replacement characters (mis-decoded upstream)
    TOO_LONG = "too_long"
    BAD_LABEL = "bad_label"
    CONTAMINATED = "contaminated"  # shares a 13-gram with a benchmark prompt
    OVER_LENGTH = "over_length"  # RM length policy "drop" (see pipelines.rm.data)
    ANNOTATION_FAILED = "annotation_failed"


class RowError(Exception):
    def __init__(self, reason: Reason, detail: str = ""):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def check_candidate(history: list[dict[str, str]], chosen: str, rejected: str, max_chars: int) -> None:
    """Raise RowError when a pair cannot be used. `max_chars` bounds the whole pair (absurd-length guard)."""
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(text, str):
            raise RowError(Reason.MALFORMED, f"{name} is not a string")
        if not text.strip():
            raise RowError(Reason.EMPTY_TEXT, f"{name} is empty")
    if not history or not any(m["role"] == "user" and m["content"].strip() for m in history):
        raise RowError(Reason.EMPTY_TEXT, "no non-empty user turn in the history")
    if chosen.strip() == rejected.strip():
        raise RowError(Reason.IDENTICAL, "chosen == rejected")
    total = len(chosen) + len(rejected) + sum(len(m["content"]) for m in history)
    if total > max_chars:
        raise RowError(Reason.TOO_LONG, f"{total} characters > {max_chars}")
    for name, text in (("chosen", chosen), ("rejected", rejected), ("history", "".join(m["content"] for m in history))):
        if "\x00" in text or "\ufffd" in text:
            raise RowError(Reason.BAD_TEXT, f"{name} contains NUL or U+FFFD")
