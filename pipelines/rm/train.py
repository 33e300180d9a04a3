"""Bradley–Terry reward-model training: one loop, nanoGPT-plain, data-parallel under torchrun.

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

Data parallelism: the schedule of global batches (batch_size pairs = micro-batch x grad_accum x world size) is the
same on every rank; each global batch is split into world x grad_accum micro-batches of balanced tokens and rank r
takes its grad_accum of them. The loss of a micro-batch is its pairs' summed loss / pairs in the global batch x world
size, so FSDP's gradient average over ranks is exactly the mean over the global batch: 2 ranks and 1 process on
the same global batches give the same weights. Validation is sharded and its counts all-reduced. Checkpoints (model,
optimizer, scheduler, step) are written by every rank together with torch.distributed.checkpoint, so a resumed
multi-rank run continues exactly; the best model is exported once, by rank 0, as a plain HF folder.

Also: AdamW with linear warmup then constant or linear decay (transformers' schedulers), bf16 autocast where
supported, gradient checkpointing, checkpoint selection by validation accuracy (the paper picks by gold accuracy),
deterministic seeds, FSDP2 per transformer block when launched by torchrun.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from pipelines.rm.data import (Encoded, EncodedPair, LengthPolicy, Renderer, encode_pairs, length_grouped_batches,
                               random_batches)
from pipelines.rm.losses import LOSSES, pair_losses
from pipelines.rm.model import RewardModel, save_reward_model


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
    max_len: int = 256
    length_policy: str = "truncate"
    loss: str = "bt"  # bt | margin_bt | listwise (see pipelines.rm.losses)
    center_coef: float = 0.0
    layout: str = "auto"  # auto | pairs | shared_prefix | packed
    group_by_length: bool = True  # False: plain shuffled batches (TRL's way; the benchmarks' peer)
    bf16: str = "auto"  # auto | true | false
    grad_checkpointing: bool = False
    disable_dropout: bool = True  # as TRL, OpenRLHF and open-instruct do for reward models
    eval_every: int = 50
    save_last_every: int = 50  # steps between resumable checkpoints in out_dir/last
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


def _rewards(batch: list[EncodedPair], flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores of every sequence, laid out [chosen of each pair..., then each pair's rejected in order] ->
    (r_chosen [B], r_rejected [B, K], mask [B, K])."""
    B = len(batch)
    K = max(len(p.rejected_all) for p in batch)
    rr = flat.new_zeros((B, K))
    mask = torch.zeros((B, K), dtype=torch.bool, device=flat.device)
    i = B
    for b, p in enumerate(batch):
        n = len(p.rejected_all)
        rr[b, :n] = flat[i:i + n]
        mask[b, :n] = True
        i += n
    return flat[:B], rr, mask


def _layout_order(batch: list[EncodedPair]) -> list[Encoded]:
    return [p.chosen for p in batch] + [e for p in batch for e in p.rejected_all]


def forward_pairs(rm: RewardModel, batch: list[EncodedPair]):
    """Rewards (chosen [B], rejected [B, K], mask) of a micro-batch in one forward pass of padded rows."""
    out = rm.model(**collate(rm, _layout_order(batch))).logits[:, 0]
    return _rewards(batch, out)


def forward_shared_prefix(rm: RewardModel, batch: list[EncodedPair]):
    """One row per pair: [history | chosen | rejected_1 | ...]; each response block attends to the history and
    itself only, its positions continuing from the history."""
    rows, meta = [], []
    for p in batch:
        k = p.shared
        blocks = [e.ids[k:] for e in p.sequences]
        rows.append(p.chosen.ids[:k] + [t for blk in blocks for t in blk])
        meta.append((k, [len(blk) for blk in blocks]))
    L = max(len(x) for x in rows)
    B = len(rows)
    ids = torch.full((B, L), rm.tokenizer.pad_token_id, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    allow = torch.zeros((B, L, L), dtype=torch.bool)
    ends: list[list[int]] = []
    for b, (row, (k, lens)) in enumerate(zip(rows, meta)):
        n = len(row)
        ids[b, :n] = torch.tensor(row)
        pos[b, :k] = torch.arange(k)
        allow[b, :k, :k] = torch.tril(torch.ones((k, k), dtype=torch.bool))
        start, e = k, []
        for m in lens:
            pos[b, start:start + m] = torch.arange(k, k + m)
            allow[b, start:start + m, :k] = True  # every response sees the history ...
            allow[b, start:start + m, start:start + m] = torch.tril(torch.ones((m, m), dtype=torch.bool))  # ... and itself
            start += m
            e.append(start - 1)
        allow[b, n:, n:] = torch.eye(L - n, dtype=torch.bool)  # pad rows attend to themselves (no NaN)
        ends.append(e)
    dtype = next(rm.model.parameters()).dtype
    mask4d = torch.zeros((B, 1, L, L), dtype=dtype).masked_fill(~allow[:, None], torch.finfo(dtype).min)
    scores = _all_position_scores(rm, input_ids=ids.to(rm.device), attention_mask=mask4d.to(rm.device),
                                  position_ids=pos.to(rm.device))
    flat_c = torch.stack([scores[b, e[0]] for b, e in enumerate(ends)])
    flat_r = torch.stack([scores[b, j] for b, e in enumerate(ends) for j in e[1:]])
    return _rewards(batch, torch.cat([flat_c, flat_r]))


def forward_packed(rm: RewardModel, batch: list[EncodedPair]):
    """Padding-free: every sequence of the micro-batch back to back in one row, positions restarting at each
    sequence; rewards read at each sequence's last token."""
    seqs = [e.ids for e in _layout_order(batch)]
    ids = torch.tensor([[t for s in seqs for t in s]], device=rm.device)
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None].to(rm.device)
    ends = torch.tensor(np.cumsum([len(s) for s in seqs]) - 1, device=rm.device)
    # no cache: transformers only reads restarting positions as packed sequences in a cache-free forward
    scores = _all_position_scores(rm, input_ids=ids, position_ids=pos, use_cache=False)[0]
    return _rewards(batch, scores[ends])


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
    """Accuracy (the chosen response beats every rejected one) and mean margin over `pairs`. Under torchrun each
    rank scores its own shard (padded to equal length so every rank runs the same forwards) and the counts are
    all-reduced: every rank returns the global figures."""
    was = rm.model.training
    rm.model.eval()
    world, rank = world_size(), rank_index()
    per = math.ceil(len(pairs) / world) if pairs else 0
    shard = pairs[rank * per:(rank + 1) * per]
    weight = [1.0] * len(shard) + [0.0] * (per - len(shard))
    shard = shard + [pairs[0]] * (per - len(shard))  # dummies, not counted
    stats = torch.zeros(3, dtype=torch.float64)  # correct, n, margin sum
    for b in length_grouped_batches(shard, batch_size):
        rc, rr, mask = forward_pairs(rm, [shard[i] for i in b])
        best_rej = rr.float().masked_fill(~mask, float("-inf")).max(1).values
        m = (rc.float() - best_rej).cpu()
        w = torch.tensor([weight[i] for i in b], dtype=torch.float64)
        stats += torch.stack([((m > 0).double() * w).sum(), w.sum(), (m.double() * w).sum()])
    stats = all_reduce_sum(stats)
    rm.model.train(was)
    n = max(float(stats[1]), 1.0)
    return {"accuracy": float(stats[0]) / n, "mean_margin": float(stats[2]) / n, "n": int(stats[1])}


def balanced_split(batch: list[int], lens: list[int], pieces: int) -> list[list[int]]:
    """Split one global batch into `pieces` micro-batches of near-equal size (counts differ by at most one) and
    balanced tokens: longest first, each to the piece with the fewest tokens that still has room."""
    cap = math.ceil(len(batch) / pieces) if batch else 0
    out: list[list[int]] = [[] for _ in range(pieces)]
    load = [0] * pieces
    for i in sorted(batch, key=lambda i: (-lens[i], i)):
        j = min((k for k in range(pieces) if len(out[k]) < cap), key=lambda k: (load[k], k))
        out[j].append(i)
        load[j] += lens[i]
    return out


def plan(train: list[EncodedPair], cfg: TrainConfig, layout: str, world: int) -> list[list[list[int]]]:
    """The whole run's data, the same on every rank: for each optimizer step, world x grad_accum micro-batches
    (lists of indices into `train`); rank r takes micro-batches [r * grad_accum, (r + 1) * grad_accum). Global
    batches are length-grouped over the whole set (or shuffled: group_by_length=False), reshuffled every epoch."""
    pieces = world * cfg.grad_accum
    if cfg.batch_size < pieces:
        raise ValueError(f"batch_size {cfg.batch_size} < world size x grad_accum = {pieces}: a global batch must give "
                         "every micro-batch at least one pair")
    n_global = math.ceil(len(train) / cfg.batch_size)
    steps = max(1, int(math.ceil(n_global * cfg.epochs)))
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    lens = [p.row_len(layout) for p in train]
    out: list[list[list[int]]] = []
    epoch = 0
    while len(out) < steps:
        seed = cfg.seed + epoch
        batches = (length_grouped_batches(train, cfg.batch_size, shuffle_seed=seed, layout=layout)
                   if cfg.group_by_length else random_batches(len(train), cfg.batch_size, seed))
        out += [balanced_split(b, lens, pieces) for b in batches[:steps - len(out)]]
        epoch += 1
    return out


def _plan_key(train: list[EncodedPair], cfg: TrainConfig, layout: str, world: int) -> str:
    """Identifies a run's data and plan (the plan is a function of these): a checkpoint resumes only its own run."""
    h = hashlib.sha256(json.dumps([world, layout, cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.max_steps, cfg.seed,
                                   cfg.group_by_length, cfg.max_len, len(train)]).encode())
    for p in train:
        h.update(p.pair_id.encode())
    return h.hexdigest()[:16]


def _save_checkpoint(path: Path, rm: RewardModel, opt, sched, step: int, best: float, key: str) -> None:
    """Model + optimizer through torch.distributed.checkpoint (every rank writes its shards), scheduler and position
    by rank 0; written beside, then swapped in, so a crash mid-save leaves the previous `last/` whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = path.with_name(path.name + ".tmp")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    model_sd, optim_sd = get_state_dict(rm.model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    if is_main_process():
        torch.save({"scheduler": sched.state_dict(), "step": step, "best": best, "plan": key,
                    "world_size": world_size()}, tmp / "trainer_state.pt")
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    barrier()


def _load_checkpoint(path: Path, rm: RewardModel, opt, sched, key: str) -> tuple[int, float] | None:
    """(step, best) after restoring `path` into the model/optimizer/scheduler, or None when there is no checkpoint
    of this run (a different plan: new data or settings start over)."""
    state_file = path / "trainer_state.pt"
    if not state_file.exists():
        return None
    state = torch.load(state_file, weights_only=False)
    if state.get("plan") != key:
        return None
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(rm.model, opt)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(rm.model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    sched.load_state_dict(state["scheduler"])
    return int(state["step"]), float(state["best"])


def train_reward_model(rm: RewardModel, train_rows: list[dict], val_rows: list[dict], cfg: TrainConfig,
                       out_dir: str, log: Callable[[dict, int], None] | None = None) -> TrainResult:
    """Train on `train_rows`, select the checkpoint by accuracy on `val_rows`; best model saved to out_dir/best.
    Under torchrun (WORLD_SIZE set) every rank calls this with the same rows; each trains on its slice."""
    seed_everything(cfg.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}: one of {LOSSES}")
    renderer = Renderer(rm, cfg.max_len, LengthPolicy(cfg.length_policy))
    train, length = encode_pairs(renderer, train_rows)
    val, _ = encode_pairs(renderer, val_rows)
    if not train:
        raise ValueError("no trainable pairs after the length policy")
    if cfg.loss == "margin_bt" and any(p.margin is None for p in train):
        raise ValueError("loss margin_bt needs a numeric `margin` on every training pair (e.g. a rating gap); "
                         f"{sum(p.margin is None for p in train)} of {len(train)} have none")
    layout = choose_layout(rm, cfg.layout)
    fwd = LAYOUTS[layout]
    distributed = maybe_wrap_fsdp(rm)
    world, rank = world_size(), rank_index()
    steps_plan = plan(train, cfg, layout, world)
    steps = len(steps_plan)
    key = _plan_key(train, cfg, layout, world)

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
    resumed = _load_checkpoint(last, rm, opt, sched, key)
    if resumed is not None:  # resume after a crash: same plan, so the same batches follow
        start, best = resumed

    history: list[dict] = []
    order = open(out / f"order-rank{rank}.jsonl", "a") if cfg.record_order else None
    rm.model.train()
    tokens, t0 = 0, time.perf_counter()
    total_tokens = 0.0
    bar = tqdm(range(start, steps), disable=not (cfg.progress and is_main_process()), desc="rm-train",
               initial=start, total=steps)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        pieces = steps_plan[step]
        n_global = sum(len(x) for x in pieces)
        stats = torch.zeros(4, dtype=torch.float64)  # loss sum, correct, pairs, tokens (this rank)
        for a in range(cfg.grad_accum):
            idx = pieces[rank * cfg.grad_accum + a]
            mb = [train[i] for i in idx] or [train[0]]  # an empty micro-batch still runs (FSDP collectives)
            w = torch.tensor([1.0] * len(idx) or [0.0], device=rm.device)
            with torch.autocast(device_type=rm.device.type, dtype=torch.bfloat16, enabled=bf16):
                rc, rr, mask = fwd(rm, mb)
            margin = (torch.tensor([p.margin or 0.0 for p in mb], device=rm.device)
                      if cfg.loss == "margin_bt" else None)
            per = pair_losses(rc, rr, kind=cfg.loss, margin=margin, mask=mask, center_coef=cfg.center_coef)
            loss = (per * w).sum() / n_global * world  # FSDP averages over ranks: the global-batch mean
            loss.backward()
            best_rej = rr.detach().float().masked_fill(~mask, float("-inf")).max(1).values
            stats += torch.stack([(per.detach() * w).sum().cpu().double(),
                                  ((rc.detach().float() > best_rej).double() * w).sum().cpu(),
                                  w.sum().cpu().double(),
                                  torch.tensor(float(sum(train[i].tokens for i in idx)), dtype=torch.float64)])
            if order is not None:
                order.write(json.dumps({"step": step + 1, "pair_ids": [train[i].pair_id for i in idx]}) + "\n")
        torch.nn.utils.clip_grad_norm_(rm.model.parameters(), 1.0)
        opt.step()
        sched.step()
        tokens += int(stats[3])
        glob = all_reduce_sum(stats)
        total_tokens += float(glob[3])
        dt = max(time.perf_counter() - t0, 1e-9)
        rec = {"step": step + 1, "loss": float(glob[0]) / n_global, "train_accuracy": float(glob[1]) / n_global,
               "lr": sched.get_last_lr()[0], "tokens_per_s": total_tokens / dt, "tokens_per_s_per_rank": tokens / dt,
               "global_batch": n_global}
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['train_accuracy']:.2f}", tok_s=f"{rec['tokens_per_s']:,.0f}")
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
        if log and is_main_process():
            log(rec, step + 1)
        if (step + 1) % cfg.save_last_every == 0 and not last_step:
            _save_checkpoint(last, rm, opt, sched, step + 1, best, key)  # every rank takes part
    if order is not None:
        order.close()
    barrier()
    if is_main_process():
        shutil.rmtree(last, ignore_errors=True)
        (out / "train_summary.json").write_text(json.dumps({"best_val_accuracy": best, "steps": steps,
                                                             "layout": layout, "world_size": world,
                                                             "length": length.as_dict()}))
    del distributed
    dt = max(time.perf_counter() - t0, 1e-9)
    return TrainResult(str(out / "best"), best, steps, history, total_tokens / dt, length.as_dict(), start,
                       world, tokens / dt)


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
