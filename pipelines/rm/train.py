"""Bradley–Terry reward-model training: one loop, nanoGPT-plain, data-parallel under torchrun.

Data: a token store (pipelines.rm.store: pairs tokenized once into memory-mapped shards) or, for small sets, pairs
encoded in memory; both are read through the same sampler and DataLoader. A rank holds no per-pair state but one
int32 permutation per epoch; DataLoader workers fetch its micro-batches from the maps and collate them
(pipelines.rm.collate) beside the training step.

Per step, every response of a micro-batch goes through the model in one forward pass. Three layouts:
- `pairs`: padded rows [chosen_1..chosen_B, rejected_1..] from length-grouped batches (any model).
- `shared_prefix` (decoders): one row per pair, history + chosen + rejected(s), with a block mask so each rejected
  block sees the history but not the other responses and positions restart after the history; the history is
  computed once per pair. Batches are grouped by the length of that row.
- `packed` (decoders; the GPU varlen path): every sequence of a micro-batch concatenated into one row with
  restarting position ids and no padding; transformers turns the restarts into per-sequence attention — varlen
  kernels under `flash_attention_2`, a block mask under sdpa/eager (correct, but dense: CPU stays on
  `shared_prefix`).
Rewards are read at each response's last token through the same score head HF uses, so a saved model scores
identically in plain `AutoModelForSequenceClassification`.

Data parallelism (pipelines.rm.sampler): the schedule of global batches (batch_size pairs) is the same on every
rank; each global batch is split into `pieces` = world x grad_accum micro-batches of balanced tokens and rank r
takes its grad_accum of them. The loss of a micro-batch is its pairs' summed loss / pairs in the global batch x
world size, so FSDP's gradient average over ranks is exactly the mean over the global batch. Gradients are reduced
once per step (no sync on accumulation micro-steps). Checkpoints (model and optimizer through
torch.distributed.checkpoint, plus scheduler, step and loader position) let a run resume exactly, also on another
number of ranks: the global batch and its split into `pieces` stay, the accumulation steps absorb the change.

Also: AdamW (or plain SGD, whose updates are not scale-invariant) with linear warmup then constant or linear decay
(transformers' schedulers), optional clipping, bf16 (FSDP mixed precision on GPUs, autocast in one process),
gradient checkpointing, checkpoint selection by validation accuracy (the paper picks by gold accuracy),
deterministic seeds.
"""

from __future__ import annotations

import hashlib
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

from pipelines.rm.calibration import from_sums
from pipelines.rm.collate import Batch, Collator, collate_packed, collate_pairs, collate_shared_prefix
from pipelines.rm.data import EncodedPair, LengthPolicy, Renderer, encode_pairs
from pipelines.rm.fsdp import maybe_wrap_fsdp
from pipelines.rm.losses import LOSSES, pair_losses
from pipelines.rm.model import RewardModel, save_reward_model
from pipelines.rm.sampler import GlobalBatchPlan, RankBatchSampler, balanced_split  # noqa: F401  (re-exported)
from pipelines.rm.shards import InMemoryPairs, TokenStore


@dataclass
class TrainConfig:
    lr: float = 3e-5
    batch_size: int = 16  # pairs per optimizer step over all ranks (the global batch)
    grad_accum: int = 1  # micro-batches per rank per step: micro-batch = batch_size / (grad_accum x world size)
    epochs: float = 1.0  # the paper trains one epoch
    max_steps: int | None = None
    warmup_ratio: float = 0.05
    schedule: str = "constant"  # constant | linear  (paper final runs: constant)
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd
    max_grad_norm: float = 1.0  # 0 = no clipping
    max_len: int = 256
    length_policy: str = "truncate"
    loss: str = "bt"  # bt | margin_bt | listwise (see pipelines.rm.losses)
    center_coef: float = 0.0
    layout: str = "auto"  # auto | pairs | shared_prefix | packed
    group_by_length: bool = True  # False: plain shuffled batches (TRL's way; the benchmarks' peer)
    mega_batch: int = 64  # global batches per length-sorted mega-batch
    bf16: str = "auto"  # auto | true | false
    grad_checkpointing: bool = False
    disable_dropout: bool = True  # as TRL, OpenRLHF and open-instruct do for reward models
    eval_every: int = 50
    save_last_every: int = 50  # steps between resumable checkpoints in out_dir/last
    loader_workers: int = -1  # DataLoader worker processes; -1 = 2 on GPUs, 0 (this process) on CPU
    seed: int = 0
    progress: bool = True
    record_order: bool = False  # each rank appends the pair ids of every micro-batch to out_dir/order-rank<r>.jsonl


@dataclass
class TrainResult:
    best_dir: str
    best_val_accuracy: float
    steps: int
    history: list[dict] = field(default_factory=list)
    tokens_per_s: float = 0.0
    length: dict = field(default_factory=dict)
    resumed_from_step: int = 0
    world_size: int = 1
    tokens_per_s_per_rank: float = 0.0
    pairs: int = 0
    data_key: str = ""
    pieces: int = 1
    grad_accum: int = 1
    consumed_pairs: int = 0
    pairs_without_margin: int = 0


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


def uses_segment_ids(rm: RewardModel) -> bool:
    return not rm.is_decoder and getattr(rm.model.config, "type_vocab_size", 1) > 1


def collator(rm: RewardModel, layout: str) -> Collator:
    return Collator(layout, rm.tokenizer.pad_token_id, uses_segment_ids(rm))


# --- forward passes ------------------------------------------------------------------------------------------------
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


def forward(rm: RewardModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewards (chosen [B], rejected [B, K], mask [B, K]) of a collated micro-batch (already on the device)."""
    if batch.layout == "pairs":
        flat = rm.model(**batch.inputs).logits[:, 0]
    elif batch.layout == "shared_prefix":
        dtype = next(rm.model.parameters()).dtype
        if torch.is_autocast_enabled(rm.device.type):
            dtype = torch.get_autocast_dtype(rm.device.type)
        allow = batch.allow[:, None]
        mask4d = torch.zeros(allow.shape, dtype=dtype, device=allow.device).masked_fill(~allow, torch.finfo(dtype).min)
        flat = _all_position_scores(rm, attention_mask=mask4d, **batch.inputs).reshape(-1)[batch.reads]
    elif batch.layout == "packed":
        # no cache: transformers only reads restarting positions as packed sequences in a cache-free forward
        flat = _all_position_scores(rm, use_cache=False, **batch.inputs)[0][batch.reads]
    else:
        raise ValueError(f"unknown layout {batch.layout!r}")
    B = batch.n_pairs
    rr = flat[batch.rejected_index].masked_fill(~batch.mask, 0.0)
    return flat[:B], rr, batch.mask


def forward_pairs(rm: RewardModel, pairs: list[EncodedPair]):
    """Rewards of encoded pairs in one forward pass of padded rows."""
    return forward(rm, collate_pairs(pairs, rm.tokenizer.pad_token_id, uses_segment_ids(rm)).to(rm.device))


def forward_shared_prefix(rm: RewardModel, pairs: list[EncodedPair]):
    return forward(rm, collate_shared_prefix(pairs, rm.tokenizer.pad_token_id).to(rm.device))


def forward_packed(rm: RewardModel, pairs: list[EncodedPair]):
    return forward(rm, collate_packed(pairs).to(rm.device))


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
    """Accuracy (the chosen response beats every rejected one) and mean margin over `pairs`, plus the sum, sum of
    squares and count of every response's reward (the checkpoint's calibration, pipelines/rm/calibration.py).
    Under torchrun each rank scores its own shard (padded to equal length so every rank runs the same forwards)
    and the counts are all-reduced: every rank returns the global figures."""
    was = rm.model.training
    rm.model.eval()
    world, rank = world_size(), rank_index()
    per = math.ceil(len(pairs) / world) if pairs else 0
    shard = pairs[rank * per:(rank + 1) * per]
    weight = [1.0] * len(shard) + [0.0] * (per - len(shard))
    shard = shard + [pairs[0]] * (per - len(shard))  # dummies, not counted
    stats = torch.zeros(6, dtype=torch.float64)  # correct, n, margin sum, reward sum, reward sum sq, rewards
    lens = np.array([p.row_len("pairs") for p in shard], dtype=np.int64)
    order = np.argsort(lens, kind="stable")
    for s in range(0, len(order), batch_size):
        b = order[s:s + batch_size]
        rc, rr, mask = forward_pairs(rm, [shard[i] for i in b])
        best_rej = rr.float().masked_fill(~mask, float("-inf")).max(1).values
        m = (rc.float() - best_rej).cpu()
        w = torch.tensor([weight[i] for i in b], dtype=torch.float64)
        rewards = torch.cat([rc.double().cpu().reshape(-1, 1), rr.double().cpu()], 1)
        counted = torch.cat([torch.ones(len(b), 1, dtype=torch.bool), mask.cpu()], 1) & (w > 0).reshape(-1, 1)
        r = rewards.masked_fill(~counted, 0.0)
        stats += torch.stack([((m > 0).double() * w).sum(), w.sum(), (m.double() * w).sum(), r.sum(),
                              (r * r).sum(), counted.double().sum()])
    stats = all_reduce_sum(stats)
    rm.model.train(was)
    n = max(float(stats[1]), 1.0)
    return {"accuracy": float(stats[0]) / n, "mean_margin": float(stats[2]) / n, "n": int(stats[1]),
            "reward_sum": float(stats[3]), "reward_sq_sum": float(stats[4]), "rewards": int(stats[5])}


# --- checkpoints ---------------------------------------------------------------------------------------------------
def run_key(data_key: str, cfg: TrainConfig, layout: str) -> str:
    """Identifies a run's data and schedule; not the number of ranks (a run resumes on another world size)."""
    fields = [data_key, layout, cfg.batch_size, cfg.epochs, cfg.max_steps, cfg.seed, cfg.group_by_length,
              cfg.mega_batch, cfg.lr, cfg.loss, cfg.optimizer, cfg.schedule, cfg.warmup_ratio]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


def _save_checkpoint(path: Path, rm: RewardModel, opt, sched, state: dict) -> None:
    """Model + optimizer through torch.distributed.checkpoint (every rank writes its shards); scheduler, step and
    loader position by rank 0 into the same folder; written beside, then swapped in, so a crash mid-save leaves
    the previous `last/` whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = path.with_name(path.name + ".tmp")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    model_sd, optim_sd = get_state_dict(rm.model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    if is_main_process():
        torch.save({**state, "scheduler": sched.state_dict()}, tmp / "trainer_state.pt")
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    barrier()


def _checkpoint_state(path: Path, key: str) -> dict | None:
    f = path / "trainer_state.pt"
    if not f.exists():
        return None
    state = torch.load(f, weights_only=False)
    return state if state.get("plan") == key else None


def _load_checkpoint(path: Path, rm: RewardModel, opt, sched, state: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(rm.model, opt)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(rm.model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    sched.load_state_dict(state["scheduler"])


def _optimizer(rm: RewardModel, cfg: TrainConfig):
    decay, no_decay = [], []
    for n, p in rm.model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n.lower() or n.endswith("bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    raise ValueError(f"optimizer must be adamw or sgd, not {cfg.optimizer!r}")


def in_memory(rm: RewardModel, rows: list[dict], cfg: TrainConfig) -> tuple[InMemoryPairs, dict]:
    """Rows (dicts) encoded here: for seed-sized sets and tests; training sets go through a token store."""
    enc, rep = encode_pairs(Renderer(rm, cfg.max_len, LengthPolicy(cfg.length_policy)), rows)
    if not enc:
        raise ValueError("no trainable pairs after the length policy")
    return InMemoryPairs(enc), rep.as_dict()


def train_reward_model(rm: RewardModel, train: TokenStore | InMemoryPairs | list[dict], val_rows: list[dict],
                       cfg: TrainConfig, out_dir: str, log: Callable[[dict, int], None] | None = None) -> TrainResult:
    """Train on `train` (a token store, or rows encoded here), select the checkpoint by accuracy on `val_rows`;
    best model saved to out_dir/best. Under torchrun every rank calls this with the same arguments and trains on
    its share. A checkpoint of the same run in out_dir/last (same data and schedule) is resumed."""
    seed_everything(cfg.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}: one of {LOSSES}")
    if isinstance(train, list):
        train, length = in_memory(rm, train, cfg)
    else:
        c = getattr(train, "manifest", {}).get("counts", {})
        length = {"pairs": c.get("rows", len(train)), "truncated": c.get("truncated", 0),
                  "dropped": c.get("refused", 0)}
    val, _ = encode_pairs(Renderer(rm, cfg.max_len, LengthPolicy(cfg.length_policy)), val_rows)
    layout = choose_layout(rm, cfg.layout)
    bf16 = use_bf16(cfg.bf16, rm.device)
    distributed = maybe_wrap_fsdp(rm, bf16=bf16 and rm.device.type == "cuda")
    mixed = distributed and bf16 and rm.device.type == "cuda"  # FSDP casts; autocast only without it
    world, rank = world_size(), rank_index()
    key = run_key(train.key, cfg, layout)
    last = out / "last"
    state = _checkpoint_state(last, key)
    pieces = state["pieces"] if state else world * cfg.grad_accum
    if pieces % world:
        raise ValueError(f"the checkpoint splits each global batch into {pieces} micro-batches, which {world} ranks "
                         "cannot share evenly")
    grad_accum = pieces // world
    plan = GlobalBatchPlan(train.row_lengths(layout), cfg.batch_size, pieces, cfg.seed, cfg.epochs, cfg.max_steps,
                           cfg.group_by_length, cfg.mega_batch)
    steps = plan.steps

    opt = _optimizer(rm, cfg)
    warm = int(cfg.warmup_ratio * steps)
    sched = (get_linear_schedule_with_warmup(opt, warm, steps) if cfg.schedule == "linear"
             else get_constant_schedule_with_warmup(opt, warm))
    if cfg.grad_checkpointing:
        rm.model.gradient_checkpointing_enable()
    if cfg.disable_dropout:
        for m in rm.model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    start, best = 0, -1.0
    if state is not None:  # resume after a crash: same plan, so the same batches follow
        _load_checkpoint(last, rm, opt, sched, state)
        start, best = int(state["step"]), float(state["best"])

    workers = cfg.loader_workers if cfg.loader_workers >= 0 else (2 if rm.device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(
        train, batch_sampler=RankBatchSampler(plan, rank, grad_accum, start), collate_fn=collator(rm, layout),
        num_workers=workers, pin_memory=rm.device.type == "cuda", prefetch_factor=4 if workers else None)
    batches = iter(loader)
    history: list[dict] = []
    order = open(out / f"order-rank{rank}.jsonl", "a") if cfg.record_order else None
    rm.model.train()
    tokens, t0 = 0, time.perf_counter()
    total_tokens = 0.0
    no_margin = 0
    bar = tqdm(range(start, steps), disable=not (cfg.progress and is_main_process()) or bool(os.environ.get("TQDM_DISABLE")), desc="rm-train",
               initial=start, total=steps)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        n_global = 0
        stats = torch.zeros(4, dtype=torch.float64)  # loss sum, correct, pairs, tokens (this rank)
        for a in range(grad_accum):
            batch = next(batches).to(rm.device)
            n_global = batch.n_global
            if distributed:  # one gradient reduction per step, on its last micro-batch
                rm.model.set_requires_gradient_sync(a == grad_accum - 1)
            with torch.autocast(device_type=rm.device.type, dtype=torch.bfloat16, enabled=bf16 and not mixed):
                rc, rr, mask = forward(rm, batch)
            margin = None
            if cfg.loss == "margin_bt":  # no stated strength: margin 0, i.e. that pair's term is plain BT
                real = batch.weight > 0
                no_margin += int((torch.isnan(batch.margin) & real).sum())
                margin = torch.nan_to_num(batch.margin, nan=0.0)
            per = pair_losses(rc, rr, kind=cfg.loss, margin=margin, mask=mask, center_coef=cfg.center_coef)
            loss = (per * batch.weight).sum() / n_global * world  # FSDP averages over ranks: the global-batch mean
            loss.backward()
            best_rej = rr.detach().float().masked_fill(~mask, float("-inf")).max(1).values
            w = batch.weight.detach().double().cpu()
            stats += torch.stack([(per.detach().double().cpu() * w).sum(),
                                  ((rc.detach().float() > best_rej).double().cpu() * w).sum(), w.sum(),
                                  torch.tensor(float(batch.tokens), dtype=torch.float64)])
            if order is not None:
                real_ids = [p for p, x in zip(batch.pair_ids, w.tolist()) if x > 0]
                order.write(json.dumps({"step": step + 1, "pair_ids": real_ids}) + "\n")
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(rm.model.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        tokens += int(stats[3])
        glob = all_reduce_sum(stats)
        total_tokens += float(glob[3])
        dt = max(time.perf_counter() - t0, 1e-9)
        rec = {"step": step + 1, "loss": float(glob[0]) / n_global, "train_accuracy": float(glob[1]) / n_global,
               "lr": sched.get_last_lr()[0], "tokens_per_s": total_tokens / dt, "tokens_per_s_per_rank": tokens / dt,
               "global_batch": n_global, "consumed_pairs": plan.consumed(step + 1)}
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['train_accuracy']:.2f}", tok_s=f"{rec['tokens_per_s']:,.0f}")
        last_step = step + 1 == steps
        if val and ((step + 1) % cfg.eval_every == 0 or last_step):
            ev = evaluate_accuracy(rm, val)
            rec["val_accuracy"] = ev["accuracy"]
            rec["val_margin"] = ev["mean_margin"]
            if ev["accuracy"] > best:
                best = ev["accuracy"]
                save_reward_model(rm, str(out / "best"))  # collective under FSDP; rank 0 writes
                if is_main_process():  # what the server standardizes `scores` with
                    from_sums(ev["reward_sum"], ev["reward_sq_sum"], ev["rewards"],
                              f"selection set, {ev['n']} pairs, step {step + 1}").write(out / "best")
        elif not val and last_step:
            save_reward_model(rm, str(out / "best"))
        history.append(rec)
        if log and is_main_process():
            log(rec, step + 1)
        if (step + 1) % cfg.save_last_every == 0 and not last_step:
            _save_checkpoint(last, rm, opt, sched, {"plan": key, "step": step + 1, "best": best, "pieces": pieces,
                                                    "world_size": world,
                                                    "loader": {"step": step + 1,
                                                               "consumed_pairs": plan.consumed(step + 1)}})
    if order is not None:
        order.close()
    no_margin = int(all_reduce_sum(torch.tensor([float(no_margin)], dtype=torch.float64))[0])
    barrier()
    if is_main_process():
        shutil.rmtree(last, ignore_errors=True)
        (out / "train_summary.json").write_text(json.dumps({
            "best_val_accuracy": best, "steps": steps, "layout": layout, "world_size": world, "pieces": pieces,
            "length": length, "data_key": train.key, "config": asdict(cfg)}))
    dt = max(time.perf_counter() - t0, 1e-9)
    return TrainResult(str(out / "best"), best, steps, history, total_tokens / dt, length, start, world, tokens / dt,
                       len(train), train.key, pieces, grad_accum, plan.consumed(steps), no_margin)


# --- distributed -------------------------------------------------------------------------------------------------
def is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank_index() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (t itself when not distributed). On NCCL the tensor travels through the GPU."""
    if not torch.distributed.is_initialized():
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else t.device
    x = t.to(dev)
    torch.distributed.all_reduce(x)
    return x.cpu()

