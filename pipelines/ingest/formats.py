"""Source formats -> canonical (history, chosen, rejected) candidates.

Each parser takes one decoded record and returns a list of `Candidate`s (UltraFeedback rows expand to several)
or raises `RowError(reason, detail)`; the caller sends refused rows to quarantine. Supported formats:

- ``hh``: Anthropic HH-RLHF, whole transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..." in `chosen`/`rejected`.
- ``trl``: TRL preference data: `chosen`/`rejected` as strings (with `prompt`) or message lists (explicit
  `prompt` list, or full conversations sharing a prefix).
- ``ultrafeedback``: `instruction` + `completions[{response, overall_score | annotations}]`, expanded to a pair
  for every two completions with different scores (ties dropped and counted).
- ``judgebench``: `question`, `response_A`, `response_B`, `label` "A>B" | "B>A".
- Any of them after a column `mapping` {canonical name: source column} (Parquet or JSONL with other names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from pipelines.ingest.checks import RowError
from pipelines.schema import Reason


@dataclass
class Candidate:
    history: list[dict[str, str]]
    chosen: str
    rejected: str
    category_hint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParseStats:
    ties_dropped: int = 0


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{user, a}, {assistant, b}]."""
    if not isinstance(text, str):
        raise RowError(Reason.NULL_FIELD, "transcript is not a string")
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip("\n")
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RowError(Reason.MALFORMED, "text before the first Human/Assistant marker")
    msgs = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if not msgs:
        raise RowError(Reason.MALFORMED, "no Human/Assistant turns")
    return msgs


def _require(rec: dict[str, Any], *names: str) -> list[Any]:
    out = []
    for n in names:
        if n not in rec:
            raise RowError(Reason.MISSING_FIELD, f"missing field {n!r}")
        if rec[n] is None:
            raise RowError(Reason.NULL_FIELD, f"field {n!r} is null")
        out.append(rec[n])
    return out


def _msgs(value: Any, what: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise RowError(Reason.MALFORMED, f"{what} is not a list of messages")
    out = []
    for m in value:
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant", "tool"):
            raise RowError(Reason.MALFORMED, f"{what}: unknown role {role!r}")
        if content is None:
            raise RowError(Reason.NULL_FIELD, f"{what}: message content is null")
        if not isinstance(content, str):
            raise RowError(Reason.MALFORMED, f"{what}: message content is not a string")
        out.append({"role": role, "content": content})
    return out


def parse_hh(rec: dict[str, Any], stats: ParseStats) -> list[Candidate]:
    chosen_t, rejected_t = _require(rec, "chosen", "rejected")
    c, r = parse_hh_transcript(chosen_t), parse_hh_transcript(rejected_t)
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise RowError(Reason.MALFORMED, "transcript does not end with an Assistant turn")
    if c[:-1] != r[:-1]:
        raise RowError(Reason.HISTORY_MISMATCH, "chosen and rejected transcripts differ before the final turn")
    return [Candidate(c[:-1], c[-1]["content"], r[-1]["content"])]


def parse_trl(rec: dict[str, Any], stats: ParseStats) -> list[Candidate]:
    chosen, rejected = _require(rec, "chosen", "rejected")
    prompt = rec.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:
            if chosen.lstrip("\n").startswith("Human:"):
                return parse_hh(rec, stats)
            raise RowError(Reason.MISSING_FIELD, "string chosen/rejected without a prompt")
        if isinstance(prompt, str):
            history = [{"role": "user", "content": prompt}]
        else:
            history = _msgs(prompt, "prompt")
        return [Candidate(history, chosen, rejected, rec.get("category"))]
    if isinstance(chosen, list) and isinstance(rejected, list):
        c, r = _msgs(chosen, "chosen"), _msgs(rejected, "rejected")
        if prompt is not None:
            history = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _msgs(prompt, "prompt")
            if len(c) != 1 or len(r) != 1:
                # Some datasets repeat the prompt inside chosen/rejected; accept it when it is exactly the prefix.
                if c[: len(history)] == history and r[: len(history)] == history:
                    c, r = c[len(history):], r[len(history):]
            if len(c) != 1 or len(r) != 1 or c[0]["role"] != "assistant" or r[0]["role"] != "assistant":
                raise RowError(Reason.MALFORMED, "with a prompt, chosen/rejected must be one assistant message")
            return [Candidate(history, c[0]["content"], r[0]["content"], rec.get("category"))]
        if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            raise RowError(Reason.MALFORMED, "conversation does not end with an assistant message")
        if c[:-1] != r[:-1]:
            raise RowError(Reason.HISTORY_MISMATCH, "chosen and rejected conversations differ before the final turn")
        return [Candidate(c[:-1], c[-1]["content"], r[-1]["content"], rec.get("category"))]
    raise RowError(Reason.MALFORMED, "chosen/rejected must both be strings or both message lists")


def _completion_score(comp: dict[str, Any]) -> float | None:
    if comp.get("overall_score") is not None:
        return float(comp["overall_score"])
    if comp.get("score") is not None:
        return float(comp["score"])
    ann = comp.get("annotations")
    if isinstance(ann, dict):
        vals = []
        for a in ann.values():
            rating = a.get("Rating") if isinstance(a, dict) else None
            try:
                vals.append(float(rating))
            except (TypeError, ValueError):
                continue
        if vals:
            return sum(vals) / len(vals)
    return None


def parse_ultrafeedback(rec: dict[str, Any], stats: ParseStats) -> list[Candidate]:
    instruction, completions = _require(rec, "instruction", "completions")
    if not isinstance(completions, list):
        raise RowError(Reason.MALFORMED, "completions is not a list")
    scored = []
    for comp in completions:
        if not isinstance(comp, dict) or not isinstance(comp.get("response"), str):
            continue
        s = _completion_score(comp)
        if s is not None:
            scored.append((s, comp["response"]))
    if len(scored) < 2:
        raise RowError(Reason.MISSING_FIELD, "fewer than two scored completions")
    out = []
    history = [{"role": "user", "content": instruction}]
    for i in range(len(scored)):
        for j in range(i + 1, len(scored)):
            (si, ri), (sj, rj) = scored[i], scored[j]
            if si == sj:
                stats.ties_dropped += 1
                continue
            ch, rj_ = (ri, rj) if si > sj else (rj, ri)
            out.append(Candidate(history, ch, rj_, rec.get("source"), {"score_gap": abs(si - sj)}))
    return out


def parse_judgebench(rec: dict[str, Any], stats: ParseStats) -> list[Candidate]:
    question, a, b, label = _require(rec, "question", "response_A", "response_B", "label")
    label = str(label).replace(" ", "")
    history = [{"role": "user", "content": question}]
    if label in ("A>B", "A>>B"):
        return [Candidate(history, a, b, rec.get("source"))]
    if label in ("B>A", "B>>A"):
        return [Candidate(history, b, a, rec.get("source"))]
    raise RowError(Reason.BAD_LABEL, f"label {label!r} is not A>B or B>A")


PARSERS: dict[str, Callable[[dict[str, Any], ParseStats], list[Candidate]]] = {
    "hh": parse_hh,
    "trl": parse_trl,
    "ultrafeedback": parse_ultrafeedback,
    "judgebench": parse_judgebench,
}


def detect_format(rec: dict[str, Any]) -> str:
    """Guess the format from one record's keys (the first decodable row of a file)."""
    keys = set(rec)
    if {"question", "response_A", "response_B", "label"} <= keys:
        return "judgebench"
    if {"instruction", "completions"} <= keys:
        return "ultrafeedback"
    if {"chosen", "rejected"} <= keys:
        c = rec.get("chosen")
        if "prompt" not in keys and isinstance(c, str) and c.lstrip("\n").startswith("Human:"):
            return "hh"
        return "trl"
    raise ValueError(f"cannot detect the format from fields {sorted(keys)}; pass format= and/or mapping=")


def apply_mapping(rec: dict[str, Any], mapping: dict[str, str] | None) -> dict[str, Any]:
    if not mapping:
        return rec
    out = dict(rec)
    for canonical, col in mapping.items():
        if col in rec:
            out[canonical] = rec[col]
    return out
