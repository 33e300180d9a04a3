"""Every reward loss in one place, per pair (the trainer sums them over a global batch). The paper trains with plain
Bradley–Terry only; the others serve data that carries more than a binary preference.

r_chosen: [B]; r_rejected: [B, K] (K rejected per chosen, `mask` [B, K] marks the real ones; K = 1 for ordinary
pairs). Computed in float32.

- `bt`: -log σ(r_w - r_l), averaged over a pair's K rejected (K-negative BT when K > 1).
- `margin_bt`: -log σ(r_w - r_l - m) with a per-pair margin m from the data (e.g. an UltraFeedback rating gap);
  a larger margin asks for a larger reward gap, so for the same rewards the loss is larger.
- `listwise`: one chosen against all its rejected as one softmax: -log softmax([r_w, r_l1..r_lK])[0].
- `center_coef` adds c·(r_w + mean r_l)^2 (Eisenstein et al. 2023, arXiv 2312.09244), keeping rewards near 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("bt", "margin_bt", "listwise")


def _as_2d(r_rejected: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    rr = r_rejected.float()
    if rr.dim() == 1:
        rr = rr[:, None]
    m = torch.ones_like(rr, dtype=torch.bool) if mask is None else mask.to(torch.bool).reshape(rr.shape)
    return rr, m


def pair_losses(r_chosen: torch.Tensor, r_rejected: torch.Tensor, *, kind: str = "bt",
                margin: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                center_coef: float = 0.0) -> torch.Tensor:
    """One loss per pair [B]."""
    rc = r_chosen.float()
    rr, m = _as_2d(r_rejected, mask)
    if kind == "bt" or kind == "margin_bt":
        shift = torch.zeros_like(rc)
        if kind == "margin_bt":
            if margin is None:
                raise ValueError("loss margin_bt needs a per-pair `margin` (a numeric column of the training data)")
            shift = margin.float().reshape(rc.shape)
        per = -F.logsigmoid(rc[:, None] - rr - shift[:, None])
        loss = (per * m).sum(1) / m.sum(1).clamp(min=1)
    elif kind == "listwise":
        logits = torch.cat([rc[:, None], rr.masked_fill(~m, float("-inf"))], dim=1)
        loss = -F.log_softmax(logits, dim=1)[:, 0]
    else:
        raise ValueError(f"unknown loss {kind!r}: one of {LOSSES}")
    if center_coef:
        mean_r = (rr * m).sum(1) / m.sum(1).clamp(min=1)
        loss = loss + center_coef * (rc + mean_r) ** 2
    return loss


def reward_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, *, kind: str = "bt",
                margin: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                center_coef: float = 0.0) -> torch.Tensor:
    """The mean of `pair_losses` over the batch."""
    return pair_losses(r_chosen, r_rejected, kind=kind, margin=margin, mask=mask, center_coef=center_coef).mean()
