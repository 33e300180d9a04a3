"""Every pairwise reward loss in one place. The paper uses plain Bradley–Terry only; the others are for ablations.

r_chosen: [B]; r_rejected: [B] or [B, K] (K rejected per chosen). Losses are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """-log σ(r_w - r_l - margin), averaged over pairs (and over the K rejected when r_rejected is [B, K])."""
    rc = r_chosen.float()
    rr = r_rejected.float()
    if rr.dim() == 2:
        rc = rc[:, None]
    if isinstance(margin, torch.Tensor) and margin.dim() == 1 and rr.dim() == 2:
        margin = margin[:, None]
    return -F.logsigmoid(rc - rr - margin).mean()


def center_reward(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """(r_w + r_l)^2 regularizer (Eisenstein et al. 2023, arXiv 2312.09244) keeping rewards centred at 0."""
    rr = r_rejected.float().mean(-1) if r_rejected.dim() == 2 else r_rejected.float()
    return ((r_chosen.float() + rr) ** 2).mean()


def listwise(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """K rejected per chosen as one softmax: -log softmax([r_w, r_l1..r_lK])[0]."""
    logits = torch.cat([r_chosen.float()[:, None], r_rejected.float().reshape(r_chosen.shape[0], -1)], dim=1)
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


def reward_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, *, kind: str = "bt",
                margin: torch.Tensor | float = 0.0, center_coef: float = 0.0) -> torch.Tensor:
    if kind == "bt":
        loss = bradley_terry(r_chosen, r_rejected)
    elif kind == "margin_bt":
        loss = bradley_terry(r_chosen, r_rejected, margin)
    elif kind == "listwise":
        loss = listwise(r_chosen, r_rejected)
    else:
        raise ValueError(f"unknown loss {kind!r}: bt | margin_bt | listwise")
    if center_coef:
        loss = loss + center_coef * center_reward(r_chosen, r_rejected)
    return loss
