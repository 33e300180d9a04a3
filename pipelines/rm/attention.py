"""Attention patterns of the shared-prefix and packed layouts, without an L x L mask where the device allows.

A collated micro-batch carries one `segment` id per token ([B, L] ints, linear in its tokens): in a shared-prefix
row 0 is the history, j >= 1 the j-th response, -1 padding; in a packed row, the sequence each token belongs to.
The pattern is "causal, and a key is visible when it is history or in the query's own segment" (shared prefix) or
"causal within one sequence" (packed). How it reaches the model depends on the attention kernel:

- `flex_attention` (GPUs): a FlexAttention `BlockMask` built from the segment ids by `create_block_mask`, a few
  ints per 128 x 128 tile; no L x L tensor exists anywhere. FlexAttention has no backward on CPU (torch raises),
  so on CPU it serves evaluation only.
- `flash_attention_2`: the packed layout through its varlen kernels (transformers reads the restarting positions);
  the shared-prefix pattern is not expressible there, so `auto` picks `packed` under it (pipelines.rm.train).
- `sdpa` / `eager`: a dense [B, 1, L, L] additive mask built on the device, from the segment ids, just before the
  forward. The collator, the DataLoader workers and /dev/shm only ever hold the segment ids.

`resolve_attn_implementation` turns `auto` (TrainConfig's default) into what the device has, for decoders:
flash_attention_2 where flash-attn is installed on a CUDA device, flex_attention on other CUDA devices, sdpa on
CPU. `create_block_mask` is always compiled: uncompiled it evaluates the mask function over all L x L pairs at
once (2.5 GB at 16k tokens on CPU, benchmarks/attention_memory.py), compiled it works tile by tile.
"""

from __future__ import annotations

import importlib.util

import torch

IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2")


def resolve_attn_implementation(requested: str | None, device: torch.device | str, decoder: bool) -> str | None:
    """The kernel to load a model with (None = transformers' default). None / '' keep transformers' default;
    `auto` picks by the device for decoders (module docstring) and keeps the default for encoders, whose `pairs`
    layout needs no custom pattern."""
    device = torch.device(device)
    name = (requested or "").strip()
    if not name:
        return None
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {', '.join(IMPLEMENTATIONS)}, not {name!r}")
    if name == "auto":
        if not decoder:
            return None
        if device.type != "cuda":
            return "sdpa"
        return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "flex_attention"
    if name == "flash_attention_2" and device.type != "cuda":
        raise ValueError("attn_implementation=flash_attention_2 needs a CUDA device: set attn_implementation=auto")
    return name


def check_trainable(attn_implementation: str, device: torch.device) -> None:
    """FlexAttention has no backward on CPU (torch raises mid-step): refuse before training instead."""
    if attn_implementation == "flex_attention" and device.type != "cuda":
        raise ValueError("attn_implementation=flex_attention cannot train on CPU (FlexAttention has no CPU "
                         "backward): set attn_implementation=auto or sdpa")


def _visible(segment: torch.Tensor, b, q, kv):
    """Shared prefix: causal, and the key is history or in the query's own block (padding sees what precedes it,
    so no row is empty; its outputs are never read)."""
    seg_kv = segment[b, kv]
    return (kv <= q) & ((seg_kv == 0) | (seg_kv == segment[b, q]))


def shared_prefix_attention(segment: torch.Tensor, attn_implementation: str, dtype: torch.dtype):
    """What the model takes as `attention_mask` for a shared-prefix micro-batch (segment ids already on the
    device): a BlockMask under flex_attention, else the dense additive mask."""
    B, L = segment.shape
    if attn_implementation == "flex_attention":
        segment = segment.long()  # inductor's CPU code for an int32 index tensor does not compile (torch 2.13)
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(lambda b, h, q, kv: _visible(segment, b, q, kv), B, None, L, L,
                                 device=segment.device, _compile=True)
    pos = torch.arange(L, device=segment.device)
    allow = _visible(segment, torch.arange(B, device=segment.device)[:, None, None], pos[None, :, None],
                     pos[None, None, :])
    # filled in place: one L x L tensor in the compute dtype, not two
    return torch.zeros((B, 1, L, L), dtype=dtype, device=segment.device).masked_fill_(
        ~allow[:, None], torch.finfo(dtype).min)


def packed_attention(segment: torch.Tensor):
    """FlexAttention BlockMask of a packed row ([1, T] sequence ids): causal within each sequence."""
    from torch.nn.attention.flex_attention import create_block_mask

    T = segment.shape[-1]
    doc = segment.long()  # as in shared_prefix_attention
    return create_block_mask(lambda b, h, q, kv: (kv <= q) & (doc[b, kv] == doc[b, q]), 1, None, T, T,
                             device=segment.device, _compile=True)
