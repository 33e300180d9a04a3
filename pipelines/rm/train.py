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

Batch sizes (pipelines.rm.sampler, pipelines.rm.memory): `batch_size` is the global batch, pairs per optimizer
step over all ranks (OpenRLHF's `train_batch_size`; TRL's per_device_train_batch_size x gradient_accumulation_steps
x world size). By default each rank's share of it is cut into micro-batches of at most `micro_batch_tokens` padded
tokens per forward, a budget derived from the device's memory and the model (checked before the first step: a
configuration that cannot fit is refused with the setting to change), so the number of accumulation micro-steps
follows the data. Fixed alternatives: `micro_batch_size` (pairs per forward per rank: OpenRLHF's
`micro_train_batch_size`, TRL's `per_device_train_batch_size`) or `grad_accum` (micro-batches per rank per step:
TRL's `gradient_accumulation_steps`). The schedule of global batches is the same on every rank. The loss of a
micro-batch is its pairs' summed loss / pairs in the global batch x world size, so FSDP's gradient average over
ranks is exactly the mean over the global batch, whatever the cut (a remainder included). Under FSDP, gradients
are reduced after every micro-batch or only after the last (`accum_sync`, pipelines.rm.fsdp.resolve_accum_sync:
the latter holds unsharded fp32 gradients). Checkpoints by step (model and optimizer through
torch.distributed.checkpoint, saved asynchronously, plus scheduler, step and loader position; see `Checkpointer`)
let a run resume exactly, also on another number of ranks: the global batches stay, the accumulation steps absorb
the change. A finished run started again returns its result; a checkpoint of another run is refused.

Precision: the weights the optimizer updates are fp32 whatever the checkpoint's dtype (transformers loads hub
checkpoints in their stored bf16; AdamW steps of lr 3e-6 vanish in bf16). Compute is bf16 where the device has it:
FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) under torchrun, autocast in one process. The
exported model is fp32 unless `export_dtype` says bfloat16.

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
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from pipelines.rm.attention import check_trainable, packed_attention, shared_prefix_attention
from pipelines.rm.calibration import from_sums
from pipelines.rm.collate import Batch, Collator, collate_packed, collate_pairs, collate_shared_prefix
from pipelines.rm.data import EncodedPair, LengthPolicy, Renderer, encode_pairs
from pipelines.rm.fsdp import maybe_wrap_fsdp, mem_params, resolve_accum_sync
from pipelines.rm.losses import LOSSES, pair_losses
from pipelines.rm.model import RewardModel, save_reward_model
from pipelines.rm.memory import (MemoryPlanError, available_bytes, check_fixed_micro_batch, estimate,  # noqa: F401
                                 token_budget)
from pipelines.rm.sampler import (GlobalBatchPlan, RankBatchSampler, balanced_split,  # noqa: F401  (re-exported)
                                  budget_split, even_out)
from pipelines.rm.shards import InMemoryPairs, TokenStore


@dataclass
class TrainConfig:
    lr: float = 3e-5
    # the global batch: pairs per optimizer step over all ranks (OpenRLHF train_batch_size; TRL
    # per_device_train_batch_size x gradient_accumulation_steps x world size)
    batch_size: int = 16
    # padded tokens per forward per rank; 0 = the most the device's memory holds for this model (pipelines.rm.memory)
    micro_batch_tokens: int = 0
    # fixed pairs per forward per rank (OpenRLHF micro_train_batch_size; TRL per_device_train_batch_size); 0 = cut
    # each rank's share by micro_batch_tokens
    micro_batch_size: int = 0
    grad_accum: int = 0  # fixed micro-batches per rank per step (TRL gradient_accumulation_steps); 0 = derived
    memory_limit_gb: float = 0.0  # what one rank may use; 0 = detected (GPU memory, or host RAM on CPU)
    export_dtype: str = "float32"  # float32 | bfloat16: the saved model's weights (training is fp32 either way)
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
    # the attention kernel (pipelines.rm.attention): auto = flash_attention_2 / flex_attention on GPUs, sdpa on CPU;
    # how the model computes, not what it learns: not part of the model's key
    attn_implementation: str = "auto"
    group_by_length: bool = True  # False: plain shuffled batches (TRL's way; the benchmarks' peer)
    mega_batch: int = 64  # global batches per length-sorted mega-batch
    bf16: str = "auto"  # auto | true | false
    grad_checkpointing: bool = False
    disable_dropout: bool = True  # as TRL, OpenRLHF and open-instruct do for reward models
    eval_every: int = 50
    save_last_every: int = 50  # steps between resumable checkpoints (out_dir/checkpoints/step-N, saved async)
    keep_last: int = 2  # step checkpoints kept (the newest); a finished run keeps none, only its exported model
    # gradient reduction on accumulation micro-steps under FSDP (pipelines.rm.fsdp.resolve_accum_sync):
    # every_step = reduce-scatter after each micro-batch (no extra memory; torchtitan's way), last_step = only on
    # the last (one reduction per step, but every rank holds the unsharded fp32 gradients: 4 bytes x parameters,
    # ~32 GB at 8B), auto = last_step where the memory estimate leaves room for that, else every_step
    accum_sync: str = "auto"
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
    micro_batch_tokens: int = 0  # the token budget per forward (0 under a fixed micro-batch size)
    memory_estimate_gb: float = 0.0  # the preflight's estimate of this rank's peak
    memory_limit_gb: float = 0.0  # what it was checked against
    accum_sync: str = ""  # every_step | last_step: what the accumulation micro-steps did (auto resolved)


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


def _attn_implementation(rm: RewardModel) -> str:
    return str(getattr(rm.model.config, "_attn_implementation", None) or "sdpa")


def forward(rm: RewardModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewards (chosen [B], rejected [B, K], mask [B, K]) of a collated micro-batch (already on the device)."""
    if batch.layout == "pairs":
        flat = rm.model(**batch.inputs).logits[:, 0]
    elif batch.layout == "shared_prefix":
        dtype = next(rm.model.parameters()).dtype
        if torch.is_autocast_enabled(rm.device.type):
            dtype = torch.get_autocast_dtype(rm.device.type)
        attention = shared_prefix_attention(batch.segment, _attn_implementation(rm), dtype)
        flat = _all_position_scores(rm, attention_mask=attention, **batch.inputs).reshape(-1)[batch.reads]
    elif batch.layout == "packed":
        # no cache: transformers only reads restarting positions as packed sequences in a cache-free forward;
        # under FlexAttention the sequences' boundaries go in as a BlockMask instead
        extra = ({"attention_mask": packed_attention(batch.segment)}
                 if _attn_implementation(rm) == "flex_attention" else {})
        flat = _all_position_scores(rm, use_cache=False, **batch.inputs, **extra)[0][batch.reads]
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
    return "packed" if _attn_implementation(rm) == "flash_attention_2" else "shared_prefix"


@torch.no_grad()  # not inference_mode: FSDP2's parameters must stay usable by autograd after evaluation
def evaluate_accuracy(rm: RewardModel, pairs: list[EncodedPair], batch_size: int = 32,
                      token_budget: int = 0) -> dict[str, float]:
    """Accuracy (the chosen response beats every rejected one) and mean margin over `pairs`, plus the sum, sum of
    squares and count of every response's reward (the checkpoint's calibration, pipelines/rm/calibration.py).
    Under torchrun each rank scores its own shard (padded to equal length so every rank runs the same forwards)
    and the counts are all-reduced: every rank returns the global figures. Batches: `batch_size` pairs, or with
    `token_budget` at most that many padded tokens (the same number of forwards on every rank)."""
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
    chunks: list[np.ndarray | None] = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if token_budget and pairs:
        width = max(len(p.sequences) for p in pairs)
        cuts = []
        for r in range(world):  # every rank's cut, so that all run the same number of forwards
            sh = pairs[r * per:(r + 1) * per]
            ln = np.array([p.row_len("pairs") for p in sh] + [pairs[0].row_len("pairs")] * (per - len(sh)))
            cuts.append(budget_split(np.arange(per), ln, width, token_budget))
        chunks = [c if len(c) else None for c in even_out(cuts[rank], max(1, max(len(c) for c in cuts)))]
    for b in chunks:
        dummy = b is None  # a stand-in forward (weight 0) where this rank has fewer pairs to cut
        b = np.array([0]) if dummy else b
        rc, rr, mask = forward_pairs(rm, [shard[i] for i in b])
        best_rej = rr.float().masked_fill(~mask, float("-inf")).max(1).values
        m = (rc.float() - best_rej).cpu()
        w = torch.tensor([0.0 if dummy else weight[i] for i in b], dtype=torch.float64)
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


class CheckpointMismatch(ValueError):
    """out_dir holds a checkpoint of another run (other data or schedule): refused, never overwritten."""


def _write_pointer(path: Path, record: dict) -> None:
    """A small JSON file replaced atomically (write beside, fsync, os.replace): a reader sees the old or the new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(record))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_pointer(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


class _Commit:
    """The commit of one async save, run in the future's done-callback; `wait` blocks until it ran and re-raises
    its error (a callback's exception would otherwise only be logged by concurrent.futures)."""

    def __init__(self):
        self._done, self._error = threading.Event(), None

    def run(self, fn) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            self._error = e
        finally:
            self._done.set()

    def wait(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise self._error


class Checkpointer:
    """Checkpoints by step under out_dir/checkpoints (why: a kill at any point loses at most the steps since the
    last save, and nothing is ever half-swapped):

    - `step-N/`: model + optimizer through torch.distributed.checkpoint (each rank writes its own shards; nothing
      is gathered), with scheduler, step and loader position in `trainer_state.pt`. Saved with `dcp.async_save`
      (the state is copied to CPU, then written by a background thread over a gloo group of its own while
      training goes on); only when every rank's shards and the metadata are written does rank 0 move the `latest`
      pointer (write-temp + os.replace) and prune all but the newest `keep_last` step folders.
    - `best-step-N/`: the best model so far (by validation accuracy), a DCP save of the sharded weights, with the
      `best` pointer holding its accuracy and the reward statistics for calibration. The plain HF folder
      out_dir/best is exported from it once, at the end (one gather to rank 0's CPU for the whole run).
    - when the run ends, `latest` records it as finished: the same run started again returns that result.
    """

    def __init__(self, out: Path, plan: str, keep_last: int):
        if keep_last < 1:
            raise ValueError("keep_last must be at least 1 (the checkpoint a resume starts from)")
        self.root, self.plan, self.keep_last = out / "checkpoints", plan, keep_last
        self.pending = None
        self._group = None
        self.root.mkdir(parents=True, exist_ok=True)

    # --- reading --------------------------------------------------------------------------------------------
    def latest(self) -> dict | None:
        """The committed `latest` record; a checkpoint of another plan is refused with how to start fresh."""
        rec = _read_pointer(self.root / "latest")
        if rec is not None and rec.get("plan") != self.plan:
            raise CheckpointMismatch(
                f"{self.root} holds a checkpoint of another run (plan {rec.get('plan')}, step {rec.get('step')}; "
                f"this run's plan is {self.plan}: other data, layout or schedule). To start this run fresh, delete "
                f"{self.root} (and {self.root.parent / 'best'}), or give it another out_dir; to continue the other "
                "run, start it with its own data and settings.")
        return rec

    def state(self, rec: dict) -> dict:
        return torch.load(self.root / rec["dir"] / "trainer_state.pt", weights_only=False)

    def load(self, rec: dict, rm: RewardModel, opt, sched, state: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(rm.model, opt)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=str(self.root / rec["dir"]))
        set_state_dict(rm.model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        sched.load_state_dict(state["scheduler"])

    # --- writing --------------------------------------------------------------------------------------------
    def _fresh_dir(self, name: str) -> Path:
        """An empty folder for a save (a partial one left by a killed run is removed first), on every rank."""
        d = self.root / name
        if is_main_process():
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        barrier()
        return d

    def _ckpt_group(self):
        """A gloo group for the background writes: their collectives must not interleave with training's."""
        if torch.distributed.is_initialized() and self._group is None:
            self._group = torch.distributed.new_group(backend="gloo")
        return self._group

    def save(self, step: int, rm: RewardModel, opt, sched, state: dict) -> None:
        """Start saving step `step` (the previous save is waited for first: one in flight at most)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.wait()
        group = self._ckpt_group()
        d = self._fresh_dir(f"step-{step}")
        if is_main_process():
            torch.save({**state, "plan": self.plan, "scheduler": sched.state_dict()}, d / "trainer_state.pt")
        model_sd, optim_sd = get_state_dict(rm.model, opt)
        record = {"plan": self.plan, "step": step, "dir": d.name}
        if hasattr(dcp, "async_save"):
            fut = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(d), process_group=group)
            committed = _Commit()
            # rank 0's future ends after the coordinator wrote the metadata: all shards are in. The commit runs in
            # the done-callback (the pointer moves as soon as the save is whole) and `wait` waits for the commit
            # itself, not only the future: Future.result() returns before its callbacks have run.
            fut.add_done_callback(lambda f: committed.run(
                lambda: f.exception() is None and is_main_process() and self._commit(record)))
            self.pending = (fut, committed)
        else:
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(d))
            if is_main_process():
                self._commit(record)
            barrier()

    def _commit(self, record: dict) -> None:
        _write_pointer(self.root / "latest", record)
        steps = sorted((int(p.name.split("-")[1]) for p in self.root.glob("step-*")), reverse=True)
        for s in steps[self.keep_last:]:
            if f"step-{s}" != record["dir"]:
                shutil.rmtree(self.root / f"step-{s}", ignore_errors=True)

    def wait(self) -> None:
        """Block until the save in flight (if any) is written and committed; raises what the save or commit raised."""
        if self.pending is not None:
            (fut, committed), self.pending = self.pending, None
            fut.result()
            committed.wait()
        barrier()

    def abandon(self) -> None:
        """After a failure in one process: let the save in flight finish and commit; its own error is dropped."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending[0].exception()
            try:
                pending[1].wait()
            except Exception:  # noqa: BLE001 - the failure being handled is the one to report
                pass

    def save_best(self, step: int, rm: RewardModel, ev: dict) -> None:
        """The best weights so far, sharded (no gather), and the pointer to them with their statistics."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        d = self._fresh_dir(f"best-step-{step}")
        dcp.save({"model": get_model_state_dict(rm.model)}, checkpoint_id=str(d))
        if is_main_process():
            _write_pointer(self.root / "best", {"plan": self.plan, "step": step, "dir": d.name, **ev})
            for p in self.root.glob("best-step-*"):
                if p.name != d.name:
                    shutil.rmtree(p, ignore_errors=True)
        barrier()

    def export_best(self, rm: RewardModel, out: Path, dtype: torch.dtype) -> None:
        """out/best as a plain HF folder from the best sharded save (or the current weights when there is none):
        the one full gather of the run. Written beside, then swapped in."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        best = _read_pointer(self.root / "best")
        if best is not None and best.get("plan") == self.plan:
            sd = {"model": get_model_state_dict(rm.model)}
            dcp.load(sd, checkpoint_id=str(self.root / best["dir"]))
            set_model_state_dict(rm.model, sd["model"])
        tmp = out / "best.export"
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        save_reward_model(rm, str(tmp), dtype)  # collective under FSDP
        if is_main_process():
            if best is not None and best.get("plan") == self.plan:  # what the server standardizes `scores` with
                from_sums(best["reward_sum"], best["reward_sq_sum"], best["rewards"],
                          f"selection set, {best['n']} pairs, step {best['step']}").write(tmp)
            shutil.rmtree(out / "best", ignore_errors=True)
            tmp.rename(out / "best")
        barrier()

    def finish(self, out: Path, result: "TrainResult", steps: int) -> None:
        """Record the run as finished (its result beside), then drop the step and best saves it no longer needs."""
        if is_main_process():
            _write_pointer(out / "train_result.json", asdict(result))
            _write_pointer(self.root / "latest", {"plan": self.plan, "step": steps, "finished": True})
            for p in [*self.root.glob("step-*"), *self.root.glob("best-step-*")]:
                shutil.rmtree(p, ignore_errors=True)
            (self.root / "best").unlink(missing_ok=True)
        barrier()


EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU_EVAL_CAP = 8192  # padded tokens per evaluation forward on CPU under a fixed micro-batch size


def master_fp32(rm: RewardModel) -> None:
    """The optimizer's weights in fp32 whatever the checkpoint's dtype (a bf16 hub checkpoint loads as bf16):
    before sharding, so FSDP's sharded parameters, the master copy, are fp32 too."""
    from pipelines.rm.fsdp import is_sharded

    low = [n for n, p in rm.model.named_parameters() if p.is_floating_point() and p.dtype != torch.float32]
    if not low:
        return
    if is_sharded(rm.model):
        raise ValueError(f"sharded parameters in {rm.model.get_parameter(low[0]).dtype} (e.g. {low[0]}): shard "
                         "fp32 weights (pipelines.rm.fsdp.load_sharded_reward_model) so the optimizer's master "
                         "copy is fp32")
    rm.model.float()


def rows_per_pair(train, layout: str) -> int:
    """Rows one pair lays in a forward: 1, or in the `pairs` layout one per response (the most any pair has,
    read in chunks: 40M pairs never become one array)."""
    if layout != "pairs":
        return 1
    tok, top = train.token_counts(), train.row_lengths("pairs")
    most = 2
    for s in range(0, len(tok), 1 << 20):
        t, m = np.asarray(tok[s:s + (1 << 20)], dtype=np.int64), np.asarray(top[s:s + (1 << 20)], dtype=np.int64)
        most = max(most, int(((t + m - 1) // np.maximum(m, 1)).max()))
    return most


def fixed_pieces(cfg: TrainConfig, world: int, state: dict | None) -> int:
    """Micro-batches per global batch when the user fixed them (grad_accum or micro_batch_size, or a resumed
    checkpoint that did); 0 = cut by tokens."""
    if state and state.get("pieces"):
        if state["pieces"] % world:
            raise ValueError(f"the checkpoint splits each global batch into {state['pieces']} micro-batches, which "
                             f"{world} ranks cannot share evenly")
        return int(state["pieces"])
    if cfg.grad_accum < 0 or cfg.micro_batch_size < 0 or cfg.micro_batch_tokens < 0:
        raise ValueError("grad_accum, micro_batch_size and micro_batch_tokens are counts (0 = derived)")
    if cfg.micro_batch_size and cfg.micro_batch_tokens:
        raise ValueError("set micro_batch_size (pairs per forward) or micro_batch_tokens (tokens per forward), "
                         "not both")
    if cfg.grad_accum:
        if cfg.micro_batch_size and math.ceil(cfg.batch_size / (world * cfg.grad_accum)) > cfg.micro_batch_size:
            raise ValueError(f"batch_size {cfg.batch_size} / ({world} ranks x grad_accum {cfg.grad_accum}) is more "
                             f"than micro_batch_size {cfg.micro_batch_size} pairs: raise grad_accum or leave it 0")
        return world * cfg.grad_accum
    if cfg.micro_batch_size:
        return world * math.ceil(math.ceil(cfg.batch_size / world) / cfg.micro_batch_size)
    return 0


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
    its share. The newest checkpoint of the same run in out_dir/checkpoints (same data and schedule) is resumed;
    a finished one returns its result without training; one of another run is refused (CheckpointMismatch)."""
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
    check_trainable(_attn_implementation(rm), rm.device)
    ckpt = Checkpointer(out, run_key(train.key, cfg, layout), cfg.keep_last)
    latest = ckpt.latest()  # refuses another run's checkpoint
    if latest is not None and latest.get("finished") and (out / "train_result.json").exists() \
            and (out / "best" / "config.json").exists():
        if is_main_process():
            print(f"[rm-train] {out}: this run finished at step {latest['step']}; returning its result", flush=True)
        return TrainResult(**json.loads((out / "train_result.json").read_text()))
    if cfg.export_dtype not in EXPORT_DTYPES:
        raise ValueError(f"export_dtype must be one of {sorted(EXPORT_DTYPES)}, not {cfg.export_dtype!r}")
    run = _Run(rm, train, val, cfg, out, layout, ckpt, latest if latest is not None and not latest.get("finished")
               else None)
    try:
        for step in run.bar:
            rec = run.step(step)
            run.after_step(step, rec, log)
    except BaseException:
        if not run.distributed:  # in one process, let the save in flight finish (under torchrun peers may be gone)
            ckpt.abandon()
        raise
    return run.finish(length)


@dataclass
class _Budget:
    """How a step is cut into forwards on this device, and why it fits (the memory estimate)."""

    pieces: int  # fixed micro-batches per step over all ranks (0: cut by `tokens`)
    tokens: int  # padded tokens per forward per rank (0 when `pieces` is fixed)
    eval_tokens: int
    peak: int  # estimated peak bytes per rank
    limit: int  # bytes one rank may use
    accum: str  # gradient sync on accumulation micro-steps: every_step | last_step


class _Run:
    """One training run's state between steps: model (fp32 master, maybe FSDP), plan, optimizer, loader,
    counters. `step` runs one optimizer step over its micro-batches; `after_step` evaluates, logs and saves."""

    def __init__(self, rm: RewardModel, train, val: list[EncodedPair], cfg: TrainConfig, out: Path, layout: str,
                 ckpt: Checkpointer, resume: dict | None):
        self.rm, self.train, self.val, self.cfg, self.out, self.layout, self.ckpt = \
            rm, train, val, cfg, out, layout, ckpt
        self.bf16 = use_bf16(cfg.bf16, rm.device)
        master_fp32(rm)
        self.distributed = maybe_wrap_fsdp(rm, bf16=self.bf16 and rm.device.type == "cuda")
        self.mixed = self.distributed and self.bf16 and rm.device.type == "cuda"  # FSDP casts; autocast only without
        self.world, self.rank = world_size(), rank_index()
        state = ckpt.state(resume) if resume is not None else None
        lens = train.row_lengths(layout)
        if len(lens) == 0:
            raise ValueError("no training pairs")
        width = rows_per_pair(train, layout)
        self.budget = self._budget(lens, width, state)
        self.plan = GlobalBatchPlan(lens, cfg.batch_size, self.budget.pieces, cfg.seed, cfg.epochs, cfg.max_steps,
                                    cfg.group_by_length, cfg.mega_batch, world=self.world,
                                    token_budget=self.budget.tokens, width=width, packed=layout == "packed")
        self.steps = self.plan.steps
        self.grad_accum = self.budget.pieces // self.world
        self.opt = _optimizer(rm, cfg)
        warm = int(cfg.warmup_ratio * self.steps)
        self.sched = (get_linear_schedule_with_warmup(self.opt, warm, self.steps) if cfg.schedule == "linear"
                      else get_constant_schedule_with_warmup(self.opt, warm))
        _prepare_for_training(rm, cfg)
        self.start, self.best = 0, -1.0
        if state is not None:  # resume after a crash: same plan, so the same batches follow
            ckpt.load(resume, rm, self.opt, self.sched, state)
            self.start, self.best = int(state["step"]), float(state["best"])
        workers = cfg.loader_workers if cfg.loader_workers >= 0 else (2 if rm.device.type == "cuda" else 0)
        loader = torch.utils.data.DataLoader(
            train, batch_sampler=RankBatchSampler(self.plan, self.rank, self.start), collate_fn=collator(rm, layout),
            num_workers=workers, pin_memory=rm.device.type == "cuda", prefetch_factor=4 if workers else None)
        self.batches = iter(loader)
        self.watched = next(rm.model.parameters())  # its sharded .grad appears when FSDP reduces (see accum_sync)
        self.history: list[dict] = []
        self.order = open(out / f"order-rank{self.rank}.jsonl", "a") if cfg.record_order else None
        rm.model.train()
        self.tokens, self.total_tokens, self.no_margin, self.t0 = 0, 0.0, 0, time.perf_counter()
        self.bar = tqdm(range(self.start, self.steps), initial=self.start, total=self.steps, desc="rm-train",
                        disable=not (cfg.progress and is_main_process()) or bool(os.environ.get("TQDM_DISABLE")))

    def _budget(self, lens: np.ndarray, width: int, state: dict | None) -> _Budget:
        """Micro-batches fixed by the config (pairs or accumulation steps, checked against the memory estimate)
        or cut by a token budget the device holds; and the accumulation sync that memory allows."""
        rm, cfg, world = self.rm, self.cfg, self.world
        limit, where = available_bytes(rm.device, cfg.memory_limit_gb)
        mem = estimate(rm.model, device=rm.device, layout=self.layout, longest_row=int(np.max(lens)), width=width,
                       world=world, sharded=self.distributed, compute_bytes=2 if self.bf16 else 4,
                       optimizer=cfg.optimizer, grad_checkpointing=cfg.grad_checkpointing,
                       attn_implementation=_attn_implementation(rm), limit=limit)
        pieces = fixed_pieces(cfg, world, state)
        if pieces:
            setting = (f"grad_accum={cfg.grad_accum}" if cfg.grad_accum else
                       f"micro_batch_size={cfg.micro_batch_size}" if cfg.micro_batch_size else
                       f"grad_accum={pieces // world} (resumed checkpoint)")
            micro_pairs = math.ceil(min(cfg.batch_size, len(lens)) / pieces)
            check_fixed_micro_batch(mem, micro_pairs, setting)
            tokens, peak = 0, mem.peak(micro_pairs * mem.longest)
            eval_tokens = min(mem.max_tokens(), CPU_EVAL_CAP if rm.device.type == "cpu" else mem.max_tokens())
        else:
            tokens = token_budget(mem, rm.device, cfg.micro_batch_tokens)
            peak, eval_tokens = mem.peak(tokens), tokens
        accum = resolve_accum_sync(cfg.accum_sync, distributed=self.distributed, params=mem_params(rm.model),
                                   peak=peak, limit=limit)
        if is_main_process():  # one line: what the run will do per forward, and why it fits
            what = (f"micro-batches of {math.ceil(cfg.batch_size / pieces)} pairs" if pieces
                    else f"micro-batches of at most {tokens:,} padded tokens")
            print(f"[rm-train] {what} per forward; estimated peak {peak / 2**30:.2f} GiB per rank of "
                  f"{limit / 2**30:.2f} GiB ({where}); accumulation sync: {accum}", flush=True)
        return _Budget(pieces, tokens, eval_tokens, peak, limit, accum)

    def step(self, step: int) -> dict:
        """One optimizer step: this step's micro-batches (the sampler says how many: the same count on every
        rank), forward + loss + backward each, then clip, step, schedule; returns the step's record."""
        rm, cfg, world = self.rm, self.cfg, self.world
        self.opt.zero_grad(set_to_none=True)
        n_global = 0
        stats = torch.zeros(4, dtype=torch.float64)  # loss sum, correct, pairs, tokens (this rank)
        more = True
        synced = 0  # micro-steps after which the sharded gradient was already reduced (accum_sync at work)
        while more:
            batch = next(self.batches).to(rm.device)
            n_global, self.grad_accum = batch.n_global, batch.micro_count
            more = batch.micro_index < batch.micro_count - 1
            if self.distributed:  # every micro-batch, or once per step on its last (accum_sync)
                rm.model.set_requires_gradient_sync(self.budget.accum == "every_step" or not more)
            with torch.autocast(device_type=rm.device.type, dtype=torch.bfloat16, enabled=self.bf16 and not self.mixed):
                rc, rr, mask = forward(rm, batch)
            margin = None
            if cfg.loss == "margin_bt":  # no stated strength: margin 0, i.e. that pair's term is plain BT
                real = batch.weight > 0
                self.no_margin += int((torch.isnan(batch.margin) & real).sum())
                margin = torch.nan_to_num(batch.margin, nan=0.0)
            per = pair_losses(rc, rr, kind=cfg.loss, margin=margin, mask=mask, center_coef=cfg.center_coef)
            loss = (per * batch.weight).sum() / n_global * world  # FSDP averages over ranks: the global-batch mean
            loss.backward()
            if self.distributed:
                synced += int(self.watched.grad is not None)
            stats += _micro_stats(per, rc, rr, mask, batch)
            if self.order is not None:
                real_ids = [p for p, x in zip(batch.pair_ids, batch.weight.tolist()) if x > 0]
                self.order.write(json.dumps({"step": step + 1, "pair_ids": real_ids}) + "\n")
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(rm.model.parameters(), cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.tokens += int(stats[3])
        glob = all_reduce_sum(stats)
        self.total_tokens += float(glob[3])
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rec = {"step": step + 1, "loss": float(glob[0]) / n_global, "train_accuracy": float(glob[1]) / n_global,
               "lr": self.sched.get_last_lr()[0], "tokens_per_s": self.total_tokens / dt,
               "tokens_per_s_per_rank": self.tokens / dt, "global_batch": n_global,
               "consumed_pairs": self.plan.consumed(step + 1), "micro_steps": self.grad_accum,
               "synced_micro_steps": synced}
        self.bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['train_accuracy']:.2f}",
                             tok_s=f"{rec['tokens_per_s']:,.0f}")
        return rec

    def after_step(self, step: int, rec: dict, log: Callable[[dict, int], None] | None) -> None:
        """Validation (and the best checkpoint, sharded) every `eval_every` steps and at the end; the log; a
        resumable checkpoint every `save_last_every` steps."""
        cfg, done = self.cfg, step + 1
        last_step = done == self.steps
        if self.val and (done % cfg.eval_every == 0 or last_step):
            ev = evaluate_accuracy(self.rm, self.val, token_budget=self.budget.eval_tokens)
            rec["val_accuracy"] = ev["accuracy"]
            rec["val_margin"] = ev["mean_margin"]
            if ev["accuracy"] > self.best:
                self.best = ev["accuracy"]
                self.ckpt.save_best(done, self.rm, ev)  # sharded: no gather; exported once at the end
        self.history.append(rec)
        if log and is_main_process():
            log(rec, done)
        if done % cfg.save_last_every == 0 and not last_step:
            self.ckpt.save(done, self.rm, self.opt, self.sched,
                           {"step": done, "best": self.best, "pieces": self.budget.pieces, "world_size": self.world,
                            "loader": {"step": done, "consumed_pairs": self.plan.consumed(done)}})

    def finish(self, length: dict) -> TrainResult:
        """The best model exported (one gather), the summary and the result written, the run marked finished."""
        out, b, steps = self.out, self.budget, self.steps
        self.ckpt.wait()
        self.ckpt.export_best(self.rm, out, EXPORT_DTYPES[self.cfg.export_dtype])
        if self.order is not None:
            self.order.close()
        no_margin = int(all_reduce_sum(torch.tensor([float(self.no_margin)], dtype=torch.float64))[0])
        barrier()
        if is_main_process():
            (out / "train_summary.json").write_text(json.dumps({
                "best_val_accuracy": self.best, "steps": steps, "layout": self.layout, "world_size": self.world,
                "pieces": b.pieces, "length": length, "data_key": self.train.key, "config": asdict(self.cfg),
                "micro_batch_tokens": b.tokens, "memory_estimate_gb": b.peak / 2**30,
                "memory_limit_gb": b.limit / 2**30}))
        dt = max(time.perf_counter() - self.t0, 1e-9)
        res = TrainResult(str(out / "best"), self.best, steps, self.history, self.total_tokens / dt, length,
                          self.start, self.world, self.tokens / dt, len(self.train), self.train.key, b.pieces,
                          self.grad_accum, self.plan.consumed(steps), no_margin, b.tokens, b.peak / 2**30,
                          b.limit / 2**30, b.accum)
        self.ckpt.finish(out, res, steps)
        return res


def _prepare_for_training(rm: RewardModel, cfg: TrainConfig) -> None:
    if cfg.grad_checkpointing:  # transformers 5 names it activation checkpointing
        (getattr(rm.model, "activation_checkpointing_enable", None) or rm.model.gradient_checkpointing_enable)()
    if cfg.disable_dropout:
        for m in rm.model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0


def _micro_stats(per: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, mask: torch.Tensor, batch: Batch
                 ) -> torch.Tensor:
    """One micro-batch's weighted loss sum, correct pairs, pairs and tokens (float64, on CPU)."""
    best_rej = rr.detach().float().masked_fill(~mask, float("-inf")).max(1).values
    w = batch.weight.detach().double().cpu()
    return torch.stack([(per.detach().double().cpu() * w).sum(),
                        ((rc.detach().float() > best_rej).double().cpu() * w).sum(), w.sum(),
                        torch.tensor(float(batch.tokens), dtype=torch.float64)])


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

