"""Bradley–Terry reward-model training: one loop, nanoGPT-plain.

Per step, chosen and rejected of a micro-batch go through the model in one forward pass. Three layouts:
- `pairs`: 2B padded rows [chosen_1..chosen_B, rejected_1..rejected_B] from length-grouped batches (any model).
- `shared_prefix` (decoders): one row per pair, history + chosen + rejected, with a block mask so the rejected
  tokens see the history but not the chosen ones and positions restart after the history; the history is
  computed once per pair instead of twice. Batches are grouped by the length of that row, not of the pair.
- `packed` (decoders; the GPU varlen path): the 2B sequences of a micro-batch concatenated into one row with
  restarting position ids and no padding at all; transformers turns the restarts into per-sequence attention —
  varlen kernels under `flash_attention_2`, a block mask under sdpa/eager (correct, but dense: CPU stays on
  `shared_prefix`).
In every layout rewards are read at each response's last token through the same score head HF uses, so a saved
model scores identically in plain `AutoModelForSequenceClassification`.

Also: gradient accumulation, AdamW with linear warmup then constant or linear decay (transformers' schedulers),
bf16 autocast where supported, gradient checkpointing, checkpoint selection by validation accuracy (the paper
picks by gold accuracy), deterministic seeds, resume from `last/` after a crash, FSDP when launched by torchrun.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from pipelines.rm.data import (Encoded, EncodedPair, LengthPolicy, Renderer, encode_pairs, length_grouped_batches,
                               random_batches)
from pipelines.rm.losses import reward_loss
from pipelines.rm.model import RewardModel, save_reward_model


@dataclass
class TrainConfig:
    lr: float = 3e-5
    batch_size: int = 16  # pairs per optimizer step (global, before accumulation split)
    grad_accum: int = 1
    epochs: float = 1.0  # the paper trains one epoch
    max_steps: int | None = None
    warmup_ratio: float = 0.05
    schedule: str = "constant"  # constant | linear  (paper final runs: constant)
    weight_decay: float = 0.0
    max_len: int = 256
    length_policy: str = "truncate"
    loss: str = "bt"
    center_coef: float = 0.0
    layout: str = "auto"  # auto | pairs | shared_prefix | packed
    group_by_length: bool = True  # False: plain shuffled batches (TRL's way; the benchmarks' peer)
    bf16: str = "auto"  # auto | true | false
    grad_checkpointing: bool = False
    disable_dropout: bool = True  # as TRL, OpenRLHF and open-instruct do for reward models
    eval_every: int = 50
    save_last_every: int = 50
    seed: int = 0
    progress: bool = True


@dataclass
class TrainResult:
    best_dir: str
    best_val_accuracy: float
    steps: int
    history: list[dict] = field(default_factory=list)
    tokens_per_s: float = 0.0
    length: dict = field(default_factory=dict)
    resumed_from_step: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_bf16(setting: str, device: torch.device) -> bool:
    if setting == "false":
        return False
    if setting == "true":
        return True
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def collate(rm: RewardModel, encoded: list[Encoded]) -> dict[str, torch.Tensor]:
    """Right-padded input ids + attention mask, and for text-pair encoders (BERT-style) the segment ids
    (0 for [CLS] conversation [SEP], 1 for the response), exactly what the tokenizer gives a text pair."""
    n = max(len(e.ids) for e in encoded)
    ids = torch.full((len(encoded), n), rm.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), n), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        mask[i, : len(e.ids)] = 1
    batch = {"input_ids": ids.to(rm.device), "attention_mask": mask.to(rm.device)}
    if not rm.is_decoder and getattr(rm.model.config, "type_vocab_size", 1) > 1:
        types = torch.zeros_like(ids)
        for i, e in enumerate(encoded):
            types[i, e.prefix_len: len(e.ids)] = 1
        batch["token_type_ids"] = types.to(rm.device)
    return batch


def forward_pairs(rm: RewardModel, batch: list[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (chosen, rejected) of a micro-batch in one forward pass of 2B padded rows."""
    out = rm.model(**collate(rm, [p.chosen for p in batch] + [p.rejected for p in batch])).logits[:, 0]
    return out[: len(batch)], out[len(batch):]


def forward_shared_prefix(rm: RewardModel, batch: list[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per pair: [history | chosen | rejected]; the rejected block attends to history + itself only."""
    rows, meta = [], []
    for p in batch:
        k = p.shared
        hist, c, r = p.chosen.ids[:k], p.chosen.ids[k:], p.rejected.ids[k:]
        rows.append(hist + c + r)
        meta.append((k, len(c), len(r)))
    L = max(len(x) for x in rows)
    B = len(rows)
    ids = torch.full((B, L), rm.tokenizer.pad_token_id, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    allow = torch.zeros((B, L, L), dtype=torch.bool)
    idx_c, idx_r = [], []
    for b, (row, (k, nc, nr)) in enumerate(zip(rows, meta)):
        n = len(row)
        ids[b, :n] = torch.tensor(row)
        pos[b, : k + nc] = torch.arange(k + nc)
        pos[b, k + nc: n] = torch.arange(k, k + nr)
        causal = torch.tril(torch.ones((n, n), dtype=torch.bool))
        causal[k + nc: n, k: k + nc] = False  # rejected tokens never see chosen tokens
        allow[b, :n, :n] = causal
        allow[b, n:, n:] = torch.eye(L - n, dtype=torch.bool)  # pad rows attend to themselves (no NaN)
        idx_c.append(k + nc - 1)
        idx_r.append(n - 1)
    dtype = next(rm.model.parameters()).dtype
    mask4d = torch.zeros((B, 1, L, L), dtype=dtype).masked_fill(~allow[:, None], torch.finfo(dtype).min)
    scores = _all_position_scores(rm, input_ids=ids.to(rm.device), attention_mask=mask4d.to(rm.device),
                                  position_ids=pos.to(rm.device))
    ar = torch.arange(B, device=rm.device)
    return scores[ar, torch.tensor(idx_c, device=rm.device)], scores[ar, torch.tensor(idx_r, device=rm.device)]


def forward_packed(rm: RewardModel, batch: list[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Padding-free: every chosen then every rejected sequence back to back in one row, positions restarting at
    each sequence; rewards read at each sequence's last token."""
    seqs = [p.chosen.ids for p in batch] + [p.rejected.ids for p in batch]
    ids = torch.tensor([[t for s in seqs for t in s]], device=rm.device)
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None].to(rm.device)
    ends = torch.tensor(np.cumsum([len(s) for s in seqs]) - 1, device=rm.device)
    # no cache: transformers only reads restarting positions as packed sequences in a cache-free forward
    scores = _all_position_scores(rm, input_ids=ids, position_ids=pos, use_cache=False)[0]
    out = scores[ends]
    return out[: len(batch)], out[len(batch):]


def _all_position_scores(rm: RewardModel, **inputs) -> torch.Tensor:
    """Reward at every position [B, L]: the HF head scores every position, then pools one; a hook keeps the
    un-pooled scores. Going through the root forward keeps FSDP's hooks (and the model's own code) in charge."""
    head = getattr(rm.model, "score", None)
    if head is None:
        raise ValueError(f"{type(rm.model).__name__} has no `score` head: this layout needs a decoder RM")
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        rm.model(**inputs)
    finally:
        hook.remove()
    return captured[-1][..., 0]


LAYOUTS = {"pairs": forward_pairs, "shared_prefix": forward_shared_prefix, "packed": forward_packed}


def choose_layout(rm: RewardModel, layout: str) -> str:
    """auto: encoders `pairs`; decoders `packed` under flash_attention_2 (varlen kernels), else `shared_prefix`."""
    if layout != "auto":
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be auto or one of {sorted(LAYOUTS)}, not {layout!r}")
        return layout
    if not rm.is_decoder:
        return "pairs"
    return "packed" if rm.model.config._attn_implementation == "flash_attention_2" else "shared_prefix"


@torch.inference_mode()
def evaluate_accuracy(rm: RewardModel, pairs: list[EncodedPair], batch_size: int = 32) -> dict[str, float]:
    was = rm.model.training
    rm.model.eval()
    correct, margins = 0, []
    for b in length_grouped_batches(pairs, batch_size):
        rc, rr = forward_pairs(rm, [pairs[i] for i in b])
        m = (rc - rr).float()
        correct += int((m > 0).sum())
        margins += m.tolist()
    rm.model.train(was)
    n = max(len(pairs), 1)
    return {"accuracy": correct / n, "mean_margin": float(np.mean(margins)) if margins else 0.0, "n": len(pairs)}


def _save_state(path: Path, rm: RewardModel, opt, sched, step: int, epoch_batches: list, cfg: TrainConfig,
                best: float) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_reward_model(rm, str(tmp))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                "batches": epoch_batches, "best": best, "torch_rng": torch.get_rng_state(),
                "config": asdict(cfg)}, tmp / "trainer_state.pt")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)  # atomic swap: a crash mid-save leaves the previous `last/` intact


def train_reward_model(rm: RewardModel, train_rows: list[dict], val_rows: list[dict], cfg: TrainConfig,
                       out_dir: str, log: Callable[[dict, int], None] | None = None) -> TrainResult:
    """Train on `train_rows`, select the checkpoint by accuracy on `val_rows`; best model saved to out_dir/best."""
    seed_everything(cfg.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    renderer = Renderer(rm, cfg.max_len, LengthPolicy(cfg.length_policy))
    train, length = encode_pairs(renderer, train_rows)
    val, _ = encode_pairs(renderer, val_rows)
    if not train:
        raise ValueError("no trainable pairs after the length policy")
    layout = choose_layout(rm, cfg.layout)
    fwd = LAYOUTS[layout]
    distributed = maybe_wrap_fsdp(rm)

    micro = max(1, cfg.batch_size // cfg.grad_accum)
    batches = (length_grouped_batches(train, micro, shuffle_seed=cfg.seed, layout=layout) if cfg.group_by_length
               else random_batches(len(train), micro, cfg.seed))
    total_micro = int(math.ceil(len(batches) * cfg.epochs))
    steps = total_micro // cfg.grad_accum if cfg.max_steps is None else min(cfg.max_steps, total_micro // cfg.grad_accum)
    steps = max(steps, 1)
    schedule = [batches[i % len(batches)] for i in range(steps * cfg.grad_accum)]

    decay, no_decay = [], []
    for n, p in rm.model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n.lower() or n.endswith("bias") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    warm = int(cfg.warmup_ratio * steps)
    sched = (get_linear_schedule_with_warmup(opt, warm, steps) if cfg.schedule == "linear"
             else get_constant_schedule_with_warmup(opt, warm))
    if cfg.grad_checkpointing:
        rm.model.gradient_checkpointing_enable()
    if cfg.disable_dropout:
        for m in rm.model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    bf16 = use_bf16(cfg.bf16, rm.device)

    start, best = 0, -1.0
    last = out / "last"
    if (last / "trainer_state.pt").exists():  # resume after a crash
        from pipelines.rm.model import load_reward_model

        state = torch.load(last / "trainer_state.pt", weights_only=False)
        resumed = load_reward_model(str(last), device=rm.device)
        rm.model.load_state_dict(resumed.model.state_dict())
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start, best, schedule = state["step"], state["best"], state["batches"]

    history: list[dict] = []
    rm.model.train()
    tokens, t0 = 0, time.perf_counter()
    bar = tqdm(range(start, steps), disable=not cfg.progress, desc="rm-train", initial=start, total=steps)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        loss_sum, acc_sum = 0.0, 0.0
        for a in range(cfg.grad_accum):
            mb = [train[i] for i in schedule[step * cfg.grad_accum + a]]
            with torch.autocast(device_type=rm.device.type, dtype=torch.bfloat16, enabled=bf16):
                rc, rr = fwd(rm, mb)
            loss = reward_loss(rc, rr, kind=cfg.loss, center_coef=cfg.center_coef) / cfg.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
            acc_sum += float((rc > rr).float().mean()) / cfg.grad_accum
            tokens += sum(p.tokens for p in mb)
        torch.nn.utils.clip_grad_norm_(rm.model.parameters(), 1.0)
        opt.step()
        sched.step()
        tps = tokens / max(time.perf_counter() - t0, 1e-9)
        rec = {"step": step + 1, "loss": loss_sum, "train_accuracy": acc_sum, "lr": sched.get_last_lr()[0],
               "tokens_per_s": tps}
        bar.set_postfix(loss=f"{loss_sum:.3f}", acc=f"{acc_sum:.2f}", tok_s=f"{tps:,.0f}")
        last_step = step + 1 == steps
        if val and ((step + 1) % cfg.eval_every == 0 or last_step):
            ev = evaluate_accuracy(rm, val)
            rec["val_accuracy"] = ev["accuracy"]
            rec["val_margin"] = ev["mean_margin"]
            if ev["accuracy"] > best:
                best = ev["accuracy"]
                save_reward_model(rm, str(out / "best"))  # collective under FSDP; rank 0 writes
        elif not val and last_step:
            save_reward_model(rm, str(out / "best"))
        history.append(rec)
        if log:
            log(rec, step + 1)
        if is_main_process() and ((step + 1) % cfg.save_last_every == 0) and not last_step:
            _save_state(last, rm, opt, sched, step + 1, schedule, cfg, best)
    shutil.rmtree(last, ignore_errors=True)
    (out / "train_summary.json").write_text(json.dumps({"best_val_accuracy": best, "steps": steps,
                                                         "layout": layout, "length": length.as_dict()}))
    del distributed
    return TrainResult(str(out / "best"), best, steps, history, tokens / max(time.perf_counter() - t0, 1e-9),
                       length.as_dict(), start)


# --- distributed -------------------------------------------------------------------------------------------------
def is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def maybe_wrap_fsdp(rm: RewardModel) -> bool:
    """Shard with FSDP2 (`fully_shard`) per transformer block when launched under torchrun (WORLD_SIZE set).

    On CPU the same code runs with world size 1 over gloo (the unit test); on GPUs with NCCL.
    """
    if "WORLD_SIZE" not in os.environ or os.environ.get("SYNPREF_NO_FSDP"):
        return False
    from torch.distributed.fsdp import fully_shard

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    for block in _transformer_blocks(rm.model):
        fully_shard(block)
    # backbone and score head are units of their own: the shared-prefix layout calls them separately
    fully_shard(getattr(rm.model, rm.model.base_model_prefix))
    if getattr(rm.model, "score", None) is not None:
        fully_shard(rm.model.score)
    fully_shard(rm.model)
    return True


def _transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    cls_names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in cls_names]
