"""Peak memory of RM training, estimated before the first step, and the micro-batch token budget derived from it.

Why: the paper's global batch (10,240 pairs of up to 16,384 tokens) cannot be one forward pass; the trainer cuts
each global batch into micro-batches of at most `micro_batch_tokens` padded tokens (pipelines.rm.sampler) and
accumulates their gradients. Left at 0, that budget is what fits the device: GPU memory, or on CPU the host RAM
this rank may use, less what the model costs whatever the batch. A configuration that cannot fit is refused here,
before training, with the setting to change, rather than killed by the OOM killer mid-step.

The estimate (per rank, bytes):
- fixed: fp32 master weights + fp32 gradients + optimizer state (AdamW: two fp32 moments), divided by the ranks
  under FSDP; plus FSDP's gathered units (two in flight, in the compute dtype) or, in one process under autocast,
  autocast's bf16 weight cache; plus the runtime (CUDA context / the Python process's own heap).
- activations: tokens x bytes per token (what autograd keeps per layer: the projections' inputs and outputs, the
  MLP's intermediates, the norms' fp32 inputs; all layers, or with activation checkpointing only each layer's
  input plus one layer recomputed), plus the attention masks the layout builds on the device: under sdpa/eager
  `shared_prefix` a [B, L, L] mask (bool, and once in the compute dtype), so tokens x L bytes more, and `packed`
  a [T, T] mask; under flex_attention (a BlockMask) or flash_attention_2's varlen kernels, none.
Coefficients are written for Llama/Qwen-style blocks (SwiGLU) and BERT alike through the config's sizes; the
test suite checks the estimate bounds the measured peak on CPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

GiB = 1024**3
CPU_TOKEN_CAP = 4096  # CPU tokens/s is flat from 2k tokens per forward (RESULTS.md); more only costs RAM
GPU_TOKEN_CAP = 131_072  # a guard on the estimate, far above what saturates a GPU
GPU_FRACTION = 0.85  # of the device's memory: the caching allocator's fragmentation and NCCL buffers
CPU_FRACTION = 0.5  # of the RAM this rank may use: the page cache, the loader workers and the others on the box


class MemoryPlanError(ValueError):
    """A training configuration that cannot fit the device; the message names the setting to change."""


@dataclass
class ModelShape:
    params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int
    largest_unit: int  # parameters of the largest FSDP unit (a block, or the embedding)

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelShape":
        cfg = model.config
        params = sum(p.numel() for p in model.parameters())  # DTensor: the global count
        h = cfg.hidden_size
        layers = cfg.num_hidden_layers
        inter = getattr(cfg, "intermediate_size", None) or 4 * h
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or h // heads
        kv = (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
        emb = cfg.vocab_size * h
        return cls(params, layers, h, inter, heads, kv, max(emb, (params - emb) // max(layers, 1)))


def layer_bytes_per_token(s: ModelShape, b: int) -> int:
    """What autograd keeps for one token in one block: attention side ~ q/k/v in and out, their norms, rotary,
    attention output and statistics, o-proj input (12 h + 6 kv), MLP side ~ gate, up, activation, product, down
    input and the allocator's slack (7 i), both norms' inputs and statistics in fp32 (16 h bytes). Measured on CPU
    (fp32, a 4-layer Qwen3 shape, hidden 256): 173 KB per token against 206 KB estimated."""
    return b * (12 * s.hidden + 6 * s.kv_dim + 7 * s.intermediate) + 16 * s.hidden


@dataclass
class MemoryPlan:
    device: str
    limit: int  # bytes this rank may use
    fixed: int  # bytes whatever the batch
    per_token: int  # activation bytes per token, no checkpointing
    per_token_ckpt: int  # with activation checkpointing
    mask_per_token_per_len: int  # shared_prefix: x L_max bytes per token
    packed_square: int  # packed without varlen kernels: x T^2 bytes
    longest: int  # padded tokens of the longest pair alone (the smallest possible micro-batch)
    longest_row: int  # its row length
    grad_checkpointing: bool

    def peak(self, tokens: int, ckpt: bool | None = None) -> int:
        ckpt = self.grad_checkpointing if ckpt is None else ckpt
        per = self.per_token_ckpt if ckpt else self.per_token
        return int(self.fixed + tokens * (per + self.mask_per_token_per_len * self.longest_row)
                   + self.packed_square * tokens * tokens)

    def max_tokens(self, ckpt: bool | None = None) -> int:
        """The most padded tokens per forward under `limit`."""
        ckpt = self.grad_checkpointing if ckpt is None else ckpt
        room = self.limit - self.fixed
        if room <= 0:
            return 0
        lin = (self.per_token_ckpt if ckpt else self.per_token) + self.mask_per_token_per_len * self.longest_row
        if self.packed_square:
            return int((-lin + math.sqrt(lin * lin + 4 * self.packed_square * room)) / (2 * self.packed_square))
        return int(room // lin)

    def breakdown(self, tokens: int) -> str:
        act = self.peak(tokens) - self.fixed
        other = self.peak(tokens, not self.grad_checkpointing)
        return (f"parameters+gradients+optimizer+runtime {self.fixed / GiB:.2f} GiB, activations of one micro-batch "
                f"of {tokens:,} tokens {act / GiB:.2f} GiB (grad_checkpointing={str(self.grad_checkpointing).lower()};"
                f" {'without' if self.grad_checkpointing else 'with'} it: {other / GiB:.2f} GiB in all)")


def available_bytes(device: torch.device, limit_gb: float = 0.0) -> tuple[int, str]:
    """What one rank may use: `limit_gb` when given; a GPU's memory x GPU_FRACTION; on CPU the RAM available to
    this process (the cgroup limit when tighter) shared by the node's ranks, x CPU_FRACTION."""
    if limit_gb > 0:
        return int(limit_gb * GiB), f"memory_limit_gb={limit_gb:g}"
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        return int(total * GPU_FRACTION), f"{GPU_FRACTION:.0%} of {total / GiB:.1f} GiB on {torch.cuda.get_device_name(device)}"
    import psutil

    have = psutil.virtual_memory().available + psutil.Process().memory_info().rss
    try:
        cg = open("/sys/fs/cgroup/memory.max").read().strip()
        if cg != "max":
            have = min(have, int(cg))
    except OSError:
        pass
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return int(have * CPU_FRACTION / local), (f"{CPU_FRACTION:.0%} of {have / GiB:.1f} GiB host RAM available"
                                              f"{f' / {local} ranks' if local > 1 else ''}")


def estimate(model: torch.nn.Module, *, device: torch.device, layout: str, longest_row: int, width: int,
             world: int, sharded: bool, compute_bytes: int, optimizer: str, grad_checkpointing: bool,
             attn_implementation: str, limit: int) -> MemoryPlan:
    s = ModelShape.of(model)
    shard = world if sharded else 1
    opt = 8 if optimizer == "adamw" else 0
    fixed = (4 + 4 + opt) * s.params // shard
    if sharded:
        fixed += 2 * s.largest_unit * compute_bytes + 4 * s.largest_unit  # gathered units + fp32 reduce buffer
    elif compute_bytes == 2:
        fixed += 2 * s.params  # autocast's bf16 copies of the weights
    fixed += GiB if device.type == "cuda" else GiB // 2
    layer = layer_bytes_per_token(s, compute_bytes)
    edge = compute_bytes * 4 * s.hidden  # embeddings out, final norm, gradient of the hidden states in flight
    per_token = s.layers * layer + 2 * layer + edge  # + one layer's gradients in flight during backward
    per_token_ckpt = s.layers * compute_bytes * s.hidden + 3 * layer + edge  # layer inputs + one recomputed
    eager = attn_implementation == "eager"
    if eager:  # attention probabilities kept per layer: heads x L per token
        per_token += s.layers * 2 * compute_bytes * s.heads * longest_row
        per_token_ckpt += 2 * compute_bytes * s.heads * longest_row
    flex = attn_implementation == "flex_attention"  # a BlockMask: no L x L tensor (pipelines.rm.attention)
    mask = (1 + compute_bytes) if layout == "shared_prefix" and not flex else 0
    square = (1 + compute_bytes) if layout == "packed" and attn_implementation not in ("flash_attention_2",
                                                                                      "flex_attention") else 0
    return MemoryPlan(str(device), limit, int(fixed), int(per_token), int(per_token_ckpt), mask, square,
                      longest_row * width, longest_row, grad_checkpointing)


def token_budget(plan: MemoryPlan, device: torch.device, requested: int) -> int:
    """The micro-batch token budget: `requested` when given (checked), else the most that fits, capped."""
    if requested > 0:
        if requested < plan.longest:
            raise MemoryPlanError(
                f"micro_batch_tokens={requested:,} is below the longest pair ({plan.longest:,} padded tokens): raise "
                f"micro_batch_tokens to at least {plan.longest:,}, or lower max_len")
        if plan.peak(requested) > plan.limit:
            fits = plan.max_tokens()
            raise MemoryPlanError(
                f"micro_batch_tokens={requested:,} needs about {plan.peak(requested) / GiB:.2f} GiB per rank > "
                f"{plan.limit / GiB:.2f} GiB ({plan.breakdown(requested)}): lower micro_batch_tokens (about "
                f"{fits:,} fits), or set it to 0 to derive it from the device")
        return requested
    cap = GPU_TOKEN_CAP if device.type == "cuda" else CPU_TOKEN_CAP
    fits = min(plan.max_tokens(), cap)
    if fits < plan.longest:
        raise MemoryPlanError(refusal(plan))
    return max(fits, plan.longest)


def refusal(plan: MemoryPlan) -> str:
    """Why even the longest pair alone does not fit, and what to change."""
    need = plan.peak(plan.longest)
    msg = (f"the longest pair ({plan.longest:,} padded tokens) needs about {need / GiB:.2f} GiB per rank > "
           f"{plan.limit / GiB:.2f} GiB ({plan.breakdown(plan.longest)}): ")
    if plan.fixed > plan.limit:
        return msg + ("the model alone does not fit: train on more ranks (--nproc / TrainerResource.nproc_per_node: "
                      "FSDP shards weights, gradients and optimizer state) or on a larger device")
    if not plan.grad_checkpointing and plan.peak(plan.longest, True) <= plan.limit:
        return msg + "set grad_checkpointing=true"
    return msg + (f"lower max_len (longest row {plan.longest_row:,} tokens), train on more ranks, or set "
                  "memory_limit_gb if this device has more memory than detected")


def check_fixed_micro_batch(plan: MemoryPlan, pairs: int, setting: str) -> None:
    """A micro-batch size the user fixed (`micro_batch_size` or `grad_accum`): refuse when `pairs` of the longest
    rows would not fit (length grouping puts the longest pairs of the data together)."""
    tokens = pairs * plan.longest
    if plan.peak(tokens) > plan.limit:
        per = max(plan.max_tokens() // max(plan.longest, 1), 0)
        raise MemoryPlanError(
            f"{setting}: micro-batches of {pairs:,} pairs of up to {plan.longest:,} padded tokens need about "
            f"{plan.peak(tokens) / GiB:.2f} GiB per rank > {plan.limit / GiB:.2f} GiB ({plan.breakdown(tokens)}): "
            f"{'raise grad_accum' if setting.startswith('grad_accum') else 'lower micro_batch_size'} (about "
            f"{per:,} pairs per micro-batch fit), or leave micro_batch_size and grad_accum at 0 so micro-batches are "
            f"cut by micro_batch_tokens")
