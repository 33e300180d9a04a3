"""FSDP2 for reward models (torchtitan's recipe, for HF sequence classifiers).

`load_sharded_reward_model` is how a torchrun rank gets its model: the module tree is built on the meta device
(parameters only; buffers such as rotary frequencies are computed for real), each transformer block, the backbone,
the score head and the root are `fully_shard`-ed, storage is allocated for the local shards only, and each rank
reads just its rows of every weight from the safetensors files. No rank ever holds the full fp32 model (an 8B
model is 32 GB in fp32). The reason this is written here rather than taken from `from_pretrained`: transformers
loads the whole checkpoint per process, and DCP's HuggingFaceStorageReader cannot (a) grow the embedding by the
reward pad row, (b) leave the new score head to a seeded init, or (c) map an encoder checkpoint's keys, which
lack the `bert.` prefix of its sequence-classification class.

Accumulation: `resolve_accum_sync` picks whether FSDP reduces gradients on every micro-step or only the last
(memory against communication; see TrainConfig.accum_sync).

On GPUs with bf16, the policy is torchtitan's: bf16 parameters in compute, fp32 gradient reduction, fp32 master
weights in the optimizer (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pipelines.rm.attention import resolve_attn_implementation
from pipelines.rm.model import RewardModel, is_decoder_config


def init_distributed() -> bool:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPU) when launched by torchrun."""
    if "WORLD_SIZE" not in os.environ or os.environ.get("SYNPREF_NO_FSDP"):
        return False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def mixed_precision(bf16: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    cls_names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in cls_names]


def shard_model(model: torch.nn.Module, bf16: bool) -> None:
    """fully_shard per transformer block, then the backbone and the score head as units of their own (the
    shared-prefix layout reads the head's per-position output through a hook), then the root."""
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision(bf16)
    for block in _transformer_blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(getattr(model, model.base_model_prefix), mp_policy=mp)
    if getattr(model, "score", None) is not None:
        fully_shard(model.score, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def maybe_wrap_fsdp(rm: RewardModel, bf16: bool = False) -> bool:
    """Shard an already loaded model when launched under torchrun (WORLD_SIZE set); True when sharded."""
    if not init_distributed():
        return False
    if not is_sharded(rm.model):
        shard_model(rm.model, bf16)
    return True


class _Checkpoint:
    """Tensors of a safetensors checkpoint (one file or an index of several), read slice by slice."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        self.handles = [safe_open(str(folder / f), framework="pt") for f in files]
        self.where = {k: h for h in self.handles for k in h.keys()}

    def find(self, name: str, prefix: str) -> str | None:
        for cand in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
            if cand in self.where:
                return cand
        return None

    def rows(self, key: str, lo: int, hi: int) -> torch.Tensor:
        return self.where[key].get_slice(key)[lo:hi]

    def shape(self, key: str) -> list[int]:
        return list(self.where[key].get_slice(key).get_shape())


def load_sharded_reward_model(name_or_path: str, *, device: str | torch.device, bf16: bool = False,
                              attn_implementation: str | None = None, seed: int = 0) -> RewardModel:
    """A sharded RM on `device`, each rank holding only its shards (see the module docstring). Parameters are
    fp32 (the optimizer's master weights); under `bf16` FSDP computes in bf16. New rows (the pad embedding) start
    at zero, a new score head from a seeded normal(0, initializer_range) like HF's init."""
    from accelerate import init_empty_weights
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    init_distributed()
    folder = Path(name_or_path)
    if not (folder / "config.json").exists():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name_or_path))  # offline: resolves from the local cache only
    config = AutoConfig.from_pretrained(folder, num_labels=1)
    tok = AutoTokenizer.from_pretrained(folder)
    decoder = is_decoder_config(config)
    attn_implementation = resolve_attn_implementation(attn_implementation, device, decoder)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) computed
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
        if decoder:
            tok.padding_side = "right"
            if tok.pad_token is None:
                tok.add_special_tokens({"pad_token": "<|reward_pad|>"})
                model.resize_token_embeddings(len(tok), mean_resizing=False)
            model.config.pad_token_id = tok.pad_token_id
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    shard_model(model, bf16)
    model.to_empty(device=device)
    for n, b in buffers.items():
        model.get_buffer(n).copy_(b.to(device))
    ckpt = _Checkpoint(folder)
    prefix = model.base_model_prefix
    gen = torch.Generator().manual_seed(seed)
    missing = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            if isinstance(p, DTensor):
                shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            else:
                shape, offset = tuple(p.shape), (0,) * p.dim()
            lo = offset[0] if p.dim() else 0
            hi = lo + (shape[0] if p.dim() else 0)
            key = ckpt.find(name, prefix)
            if key is None:  # the new score head: HF's normal init, seeded, drawn whole then sliced (rank-invariant)
                missing.append(name)
                full = torch.randn(tuple(p.shape), generator=gen) * getattr(config, "initializer_range", 0.02)
                local.copy_(full[lo:hi] if p.dim() else full)
                continue
            have = ckpt.shape(key)[0] if p.dim() else 0
            if p.dim() == 0:
                local.copy_(ckpt.where[key].get_tensor(key))
                continue
            local.zero_()
            take_hi = min(hi, have)
            if take_hi > lo:  # rows past the checkpoint's (the pad row) stay zero
                local[: take_hi - lo].copy_(ckpt.rows(key, lo, take_hi).to(local.dtype))
    unknown = [m for m in missing if not m.startswith("score")]
    if unknown:
        raise ValueError(f"{name_or_path}: no weights for {unknown[:5]} (checkpoint keys do not match "
                         f"{type(model).__name__})")
    return RewardModel(model, tok, decoder, str(name_or_path))


# --- gradient accumulation ------------------------------------------------------------------------------------------
ACCUM_SYNC = ("auto", "every_step", "last_step")


def mem_params(model: torch.nn.Module) -> int:
    """Parameters of the whole model (a DTensor counts its global size)."""
    return sum(p.numel() for p in model.parameters())


def no_sync_bytes(params: int) -> int:
    """What skipping the reduction on accumulation micro-steps costs each rank: FSDP2 then keeps every parameter's
    unsharded gradient, upcast to the fp32 reduce dtype, until the last micro-step (4 bytes x parameters: ~32 GB
    at 8B, on top of the sharded state the memory estimate already counts)."""
    return 4 * params


def resolve_accum_sync(setting: str, *, distributed: bool, params: int, peak: int, limit: int) -> str:
    """`every_step` or `last_step` for FSDP's `set_requires_gradient_sync` on accumulation micro-steps.

    every_step: reduce-scatter after each micro-batch into the sharded gradient (no extra memory, one reduction per
    micro-step; torchtitan's choice). last_step: one reduction per optimizer step, at the price of
    `no_sync_bytes` per rank. auto: last_step when the estimated peak plus that still fits `limit`, else every_step.
    In one process nothing is reduced: last_step (plain accumulation). An explicit last_step that cannot fit is
    refused before training."""
    from pipelines.rm.memory import GiB, MemoryPlanError

    if setting not in ACCUM_SYNC:
        raise ValueError(f"accum_sync must be one of {ACCUM_SYNC}, not {setting!r}")
    if not distributed:
        return "last_step"
    extra = no_sync_bytes(params)
    fits = peak + extra <= limit
    if setting == "auto":
        return "last_step" if fits else "every_step"
    if setting == "last_step" and not fits:
        raise MemoryPlanError(
            f"accum_sync=last_step keeps unsharded fp32 gradients ({extra / GiB:.2f} GiB per rank) on top of the "
            f"estimated peak {peak / GiB:.2f} GiB > {limit / GiB:.2f} GiB: set accum_sync=every_step (or auto)")
    return setting
