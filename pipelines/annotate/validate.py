"""Asking an LLM for JSON that validates, and counting what came back (one RunStats per run).

Invalid output (unparseable, off-schema, refusal) is re-asked with a repair note; after `max_attempts` the sample
is a failure with its reason and raw output. A request the endpoint never answered (down, rate limited past the
retry budget, malformed bodies: `Completion.transient`) is *unavailable*: nothing is written for it, and each
runner raises LLMUnavailable once it has committed what was answered, so no caller turns a missing answer into a
decision; the next run asks again. A configuration error (bad key) raises LLMConfigError from the backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from pydantic import BaseModel, ValidationError

from pipelines.annotate.backends import Backend, LLMUnavailable, Request
from pipelines.annotate.cost import Usage
from pipelines.schema import LabelOrigin

REPAIR = ("\n\nYour previous answer was not valid: {error}\nAnswer again with ONLY one JSON object matching the "
          "schema, no other text.")
REFUSAL_MARKERS = ("i cannot help", "i can't help", "i'm sorry, but", "as an ai")
UNAVAILABLE = "unavailable"  # error prefix of a sample the endpoint never answered: not data, never written


@dataclass
class RunStats:
    requested: int = 0
    skipped_cached: int = 0
    ok: int = 0
    failed: int = 0
    unavailable: int = 0  # samples with no answer after the backend's retries (not written; asked again next run)
    retries: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    seconds: float = 0.0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    last_unavailable: str = ""  # the last transport error seen (for the message)
    usage: dict[str, Usage] = field(default_factory=dict)  # per model, for pricing (pipelines/annotate/cost.py)

    def tally(self, parsed: BaseModel | None, err: str | None) -> bool:
        """Count one result; failures by the reason code before the first colon. Returns whether it parsed."""
        if parsed is not None:
            self.ok += 1
            return True
        if unavailable(err):
            self.unavailable += 1
        else:
            self.failed += 1
        key = (err or "unknown").split(":")[0]
        self.failures_by_reason[key] = self.failures_by_reason.get(key, 0) + 1
        return False

    def merge(self, other: "RunStats") -> None:
        """Add another run's counts (a judge that ran in its own thread)."""
        for k in ("requested", "skipped_cached", "ok", "failed", "unavailable", "retries", "tokens_in", "tokens_out"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for k, v in other.failures_by_reason.items():
            self.failures_by_reason[k] = self.failures_by_reason.get(k, 0) + v
        self.last_unavailable = other.last_unavailable or self.last_unavailable
        for model, u in other.usage.items():
            self.usage.setdefault(model, Usage()).add(u)

    def raise_if_unavailable(self, what: str) -> None:
        """After committing what was answered: refuse to go on when some request got no answer at all."""
        if self.unavailable:
            reasons = {k: v for k, v in self.failures_by_reason.items() if k == UNAVAILABLE}
            raise LLMUnavailable(f"{what}: {self.unavailable} LLM answer(s) missing after retries ({self.last_unavailable}); "
                                 f"{self.ok} answered and kept. Nothing was recorded for the missing ones: rerun once the "
                                 f"endpoint answers ({reasons})", self)

    def as_metadata(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("usage", "last_unavailable")}
        d["pairs_per_s"] = round(self.requested / self.seconds, 2) if self.seconds else 0.0
        return d


def unavailable(err: str | None) -> bool:
    """Whether a result's error means the endpoint never answered (so nothing is known about the pair)."""
    return bool(err) and err.startswith(UNAVAILABLE)


def parse_json(text: str, model: type[BaseModel]) -> tuple[BaseModel | None, str | None]:
    t = text.strip()
    if t.startswith("```"):
        t = t.strip("`").split("\n", 1)[-1]
    if not t.startswith("{") and any(m in t.lower()[:200] for m in REFUSAL_MARKERS):
        return None, "refusal"
    start, end = t.find("{"), t.rfind("}")
    if start < 0 or end < start:
        return None, "unparseable: no JSON object"
    try:
        obj = json.loads(t[start:end + 1], strict=False)  # tolerate raw control characters inside strings
    except json.JSONDecodeError as e:
        return None, f"unparseable: {e.msg}"
    try:
        return model.model_validate(obj), None
    except ValidationError as e:
        return None, "off-schema: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()[:3])


def generate_validated(backend: Backend, requests: list[Request], model: type[BaseModel], max_attempts: int,
                       stats: RunStats, tokens: list[list[int]] | None = None
                       ) -> list[list[tuple[BaseModel | None, str, str | None, int]]]:
    """For each request, n samples of (parsed | None, raw text, error, attempts). Bad samples are re-asked
    (whole request, with the repair note) until they validate or attempts run out. `tokens`, when given, receives
    [tokens_in, tokens_out] per request summed over its attempts."""
    results: list[list[Any]] = [[None] * r.n for r in requests]
    per_request = [[0, 0] for _ in requests]
    usage = stats.usage.setdefault(backend.model_id, Usage())
    usage.requests += len(requests)
    pending = list(range(len(requests)))
    attempt = 0
    current = list(requests)
    while pending and attempt < max_attempts:
        attempt += 1
        comps = backend.generate([current[i] for i in pending])
        still = []
        for i, comp in zip(pending, comps):
            stats.tokens_in += comp.tokens_in
            stats.tokens_out += comp.tokens_out
            usage.tokens_in += comp.tokens_in
            usage.tokens_out += comp.tokens_out
            per_request[i][0] += comp.tokens_in
            per_request[i][1] += comp.tokens_out
            if comp.error is not None:
                err = f"{UNAVAILABLE}: {comp.error}" if comp.transient else f"request failed: {comp.error}"
                if comp.transient:
                    stats.last_unavailable = comp.error
                for s in range(requests[i].n):
                    if results[i][s] is None or results[i][s][0] is None:
                        results[i][s] = (None, "", err, attempt)
                continue  # transport failures were already retried inside the backend
            errors = []
            for s in range(requests[i].n):
                if results[i][s] is not None and results[i][s][0] is not None:
                    continue
                text = comp.texts[s] if s < len(comp.texts) else ""
                parsed, err = parse_json(text, model)
                results[i][s] = (parsed, text, err, attempt)
                if err:
                    errors.append(err)
            if errors:
                still.append(i)
                stats.retries += 1
                usage.retries += 1
                current[i] = Request(**{**requests[i].__dict__,
                                        "prompt": requests[i].prompt + REPAIR.format(error=errors[0])})
        pending = still
    for r in results:
        for sample in r:
            if sample is not None and sample[0] is not None:
                usage.ok += 1
            elif sample is not None and unavailable(sample[2]):
                usage.unavailable += 1
            else:
                usage.failed += 1
    if tokens is not None:
        tokens[:] = per_request
    return results


def label_origin_of(backend: Backend) -> str:
    return LabelOrigin.SIMULATED.value if backend.kind == "simulated" else LabelOrigin.LLM.value


def chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
