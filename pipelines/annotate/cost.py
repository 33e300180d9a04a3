"""What the LLM work costs: requests, tokens, failures and retries per task and model, priced.

Every LLM call already counts its tokens (validate.generate_validated); this module adds them up per (task, model)
and prices them: a hosted model by its list price per 1M input/output tokens, a self-hosted fleet by GPU-hours
(the wall time the LLM steps took x GPUs x price per GPU-hour). Models without a price cost 0 and are marked so.
Stage 2 projects its whole pool's cost from what the pairs it ran cost, since only unconfident pairs reach the LLMs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Usage:
    requests: int = 0
    ok: int = 0
    failed: int = 0  # answered, but invalid after every repair attempt (recorded against the pair)
    unavailable: int = 0  # never answered after the transport's retries (not recorded; the step did not finish)
    retries: int = 0  # re-asks after an invalid answer (transport retries happen inside the backend)
    tokens_in: int = 0
    tokens_out: int = 0

    def add(self, other: "Usage") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


@dataclass(frozen=True)
class Pricing:
    """usd_per_mtok: model -> (USD per 1M input tokens, USD per 1M output tokens). gpu_hour_usd x gpus prices a
    self-hosted fleet by the LLM steps' wall time instead (0 = not priced)."""

    usd_per_mtok: dict[str, tuple[float, float]] = field(default_factory=dict)
    gpu_hour_usd: float = 0.0
    gpus: int = 0

    def token_cost(self, model: str, u: Usage) -> float:
        p_in, p_out = self.usd_per_mtok.get(model, (0.0, 0.0))
        return (u.tokens_in * p_in + u.tokens_out * p_out) / 1e6

    def fleet_cost(self, llm_seconds: float) -> float:
        return llm_seconds / 3600 * self.gpus * self.gpu_hour_usd


@dataclass
class LLMLedger:
    """Usage per task ("attributes", "judge", "precheck") and model, accumulated over a run's units."""

    by_task: dict[str, dict[str, Usage]] = field(default_factory=dict)
    llm_seconds: float = 0.0

    def add(self, task: str, model: str, u: Usage) -> None:
        self.by_task.setdefault(task, {}).setdefault(model, Usage()).add(u)

    def add_usage(self, task: str, per_model: dict[str, Usage]) -> None:
        for model, u in per_model.items():
            self.add(task, model, u)

    def rows(self, pricing: Pricing) -> list[dict]:
        return [{"task": t, "model": m, **asdict(u), "cost_usd": round(pricing.token_cost(m, u), 6),
                 "priced": m in pricing.usd_per_mtok}
                for t, ms in sorted(self.by_task.items()) for m, u in sorted(ms.items())]

    def summary(self, pricing: Pricing) -> dict:
        rows = self.rows(pricing)
        tokens = sum(r["cost_usd"] for r in rows)
        fleet = pricing.fleet_cost(self.llm_seconds)
        return {"llm_requests": sum(r["requests"] for r in rows), "llm_failed": sum(r["failed"] for r in rows),
                "llm_unavailable": sum(r["unavailable"] for r in rows),
                "llm_retries": sum(r["retries"] for r in rows), "llm_tokens_in": sum(r["tokens_in"] for r in rows),
                "llm_tokens_out": sum(r["tokens_out"] for r in rows), "llm_cost_usd": round(tokens + fleet, 4),
                "llm_token_cost_usd": round(tokens, 4), "llm_fleet_cost_usd": round(fleet, 4),
                "llm_seconds": round(self.llm_seconds, 2)}


def projected_pool_cost(cost_usd: float, pairs_run: int, pool_estimate: int) -> float | None:
    """The whole pool's LLM cost at the rate of the pairs run (their unconfident share reached the LLMs)."""
    return round(cost_usd / pairs_run * pool_estimate, 2) if pairs_run else None


def usage_markdown(rows: list[dict]) -> str:
    if not rows:
        return "No LLM request in this run (every pair confident, or every answer cached)."
    cols = ["task", "model", "requests", "ok", "failed", "unavailable", "retries", "tokens_in", "tokens_out", "cost_usd"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) + ("" if c != "cost_usd" or r["priced"] else " (unpriced)")
                                for c in cols) + " |" for r in rows]
    return "\n".join(lines)
