"""Which pairs each optimizer step trains on, on every rank, computed rather than stored.

The plan is a pure function of (pair lengths, batch size, micro-batches per global batch, seed, epochs): every
rank computes the same global batches without talking to the others, and a resumed run (on any number of ranks)
computes the same ones again from the step it resumes at, which is the whole loader state a checkpoint needs.

Per epoch: one seeded permutation of the N pair indices (int32, 4 bytes a pair: the only per-pair state a rank
holds; lengths are memory-mapped from the token store). With length grouping (the default) the permutation is cut
into mega-batches of `mega` global batches (at most a quarter of an epoch); each mega-batch is sorted by row length, cut into global batches and
those are shuffled (Megatron/HF "mega-batch" grouping): little padding, yet different batches every epoch. Each
global batch is split into `pieces` = world size x grad_accum micro-batches of near-equal pair counts and balanced
tokens; rank r trains on micro-batches [r * grad_accum, (r + 1) * grad_accum).

Two ways to cut a global batch into micro-batches:
- fixed (`pieces` > 0: the user gave `grad_accum` or `micro_batch_size`): world x grad_accum micro-batches of
  near-equal pair counts, as above.
- by tokens (`pieces` = 0, `token_budget` > 0: the default): the global batch is first split into `world` rank
  shares of balanced tokens, then each share is cut, longest pairs first, into micro-batches whose padded tokens
  (what one forward holds in memory) stay within the budget. Every rank computes every rank's cut, so all take the
  same number of micro-steps (shares needing fewer are cut finer; FSDP needs the same forwards on every rank).
  The number of micro-steps (gradient accumulation) thus follows the data: many for long pairs, few for short.
The loss divides by the pairs of the global batch, so either cut gives the same gradient (up to float order).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

MEGA = 64  # global batches per length-sorted mega-batch


def balanced_split(batch: np.ndarray, lens: np.ndarray, pieces: int) -> list[np.ndarray]:
    """Split one global batch into `pieces` micro-batches whose pair counts differ by at most one and whose tokens
    are balanced: longest first, each to the piece with the fewest tokens that still has room. `lens` are the
    lengths of `batch`'s pairs, in the same order."""
    cap = math.ceil(len(batch) / pieces) if len(batch) else 0
    out: list[list[int]] = [[] for _ in range(pieces)]
    heap = [(0, k) for k in range(pieces)]
    for j in sorted(range(len(batch)), key=lambda j: (-int(lens[j]), int(batch[j]))):
        load, k = heapq.heappop(heap)
        out[k].append(int(batch[j]))
        if len(out[k]) < cap:
            heapq.heappush(heap, (load + int(lens[j]), k))
    return [np.asarray(x, dtype=np.int64) for x in out]


def padded_tokens(lens: np.ndarray, width: int = 1, packed: bool = False) -> int:
    """Tokens one forward of these pairs holds: every row padded to the longest (`width` = rows per pair: the
    `pairs` layout lays each response in a row of its own), or the plain sum when packed (no padding)."""
    if len(lens) == 0:
        return 0
    lens = np.asarray(lens, dtype=np.int64)
    return int(lens.sum()) if packed else int(len(lens) * width * int(lens.max()))


def budget_split(idx: np.ndarray, lens: np.ndarray, width: int, budget: int, packed: bool = False) -> list[np.ndarray]:
    """Cut `idx` (lengths `lens`) into micro-batches of at most `budget` padded tokens: longest first, each
    micro-batch filled until the next pair would overflow it. A pair longer than the budget gets a micro-batch of
    its own (the preflight refuses budgets below the longest pair)."""
    lens = np.asarray(lens, dtype=np.int64)
    order = sorted(range(len(idx)), key=lambda j: (-int(lens[j]), int(idx[j])))
    out: list[list[int]] = []
    cur: list[int] = []
    top = total = 0
    for j in order:
        n_top, n_total = max(top, int(lens[j])), total + int(lens[j])
        cost = n_total if packed else (len(cur) + 1) * width * n_top
        if cur and cost > budget:
            out.append(cur)
            cur, n_top, n_total = [], int(lens[j]), int(lens[j])
        cur.append(int(idx[j]))
        top, total = n_top, n_total
    if cur:
        out.append(cur)
    return [np.asarray(x, dtype=np.int64) for x in out]


def even_out(chunks: list[np.ndarray], count: int) -> list[np.ndarray]:
    """`chunks` cut into exactly `count` micro-batches: the largest splittable one is halved until there are
    enough (halving only lowers a micro-batch's tokens); empty arrays (stand-ins) where no pair is left to split."""
    chunks = list(chunks)
    while len(chunks) < count:
        k = max(range(len(chunks)), key=lambda i: len(chunks[i])) if chunks else -1
        if k < 0 or len(chunks[k]) < 2:
            chunks += [np.zeros(0, dtype=np.int64)] * (count - len(chunks))
            break
        c = chunks.pop(k)
        chunks[k:k] = [c[: len(c) // 2], c[len(c) // 2:]]
    return chunks


def split_for_ranks(batch: np.ndarray, lens: np.ndarray, width: int, world: int, budget: int,
                    packed: bool = False) -> list[list[np.ndarray]]:
    """Each rank's micro-batches of one global batch under a token budget, the same count for every rank."""
    lens = np.asarray(lens, dtype=np.int64)
    where = {int(b): j for j, b in enumerate(batch)}
    cuts = []
    for share in balanced_split(batch, lens, world):
        pos = np.asarray([where[int(i)] for i in share], dtype=np.int64)
        cuts.append(budget_split(share, lens[pos], width, budget, packed) if len(share) else [])
    count = max(1, max(len(c) for c in cuts))
    return [even_out(c, count) for c in cuts]


@dataclass
class GlobalBatchPlan:
    row_len: np.ndarray  # [N] padded row length of each pair in the layout trained (grouping, balancing)
    batch_size: int  # pairs per global batch (optimizer step)
    pieces: int  # micro-batches per global batch (world size x grad_accum); 0 = cut by `token_budget`
    seed: int = 0
    epochs: float = 1.0
    max_steps: int | None = None
    group_by_length: bool = True
    mega: int = MEGA
    world: int = 1  # ranks sharing each global batch
    token_budget: int = 0  # padded tokens per micro-batch (forward) when `pieces` is 0
    width: int = 1  # rows per pair in a forward (the `pairs` layout: one per response)
    packed: bool = False  # micro-batch tokens are the sum of lengths (no padding)
    _epoch_cache: tuple[int, np.ndarray] | None = field(default=None, repr=False)
    _mega_cache: tuple[tuple[int, int], list[np.ndarray]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.pieces == 0 and self.token_budget <= 0:
            raise ValueError("a plan needs fixed `pieces` or a `token_budget`")
        if self.pieces % self.world:
            raise ValueError(f"{self.pieces} micro-batches per global batch cannot be shared evenly by {self.world} "
                             "ranks")
        if self.batch_size < max(self.pieces, self.world):
            raise ValueError(f"batch_size {self.batch_size} < world size x grad_accum = {self.pieces}: a global batch "
                             "must give every micro-batch at least one pair")
        if len(self.row_len) == 0:
            raise ValueError("no training pairs")

    @property
    def n(self) -> int:
        return len(self.row_len)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size)

    @property
    def steps(self) -> int:
        s = max(1, math.ceil(self.steps_per_epoch * self.epochs))
        return min(s, self.max_steps) if self.max_steps is not None else s

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            perm = np.arange(self.n, dtype=np.int32 if self.n < 2**31 else np.int64)
            np.random.default_rng([self.seed, epoch]).shuffle(perm)
            self._epoch_cache = (epoch, perm)
            self._mega_cache = None
        return self._epoch_cache[1]

    @property
    def mega_batches(self) -> int:
        """Global batches per mega-batch: `mega`, but at most a quarter of an epoch, so that even a small set is cut
        into several mega-batches and its batches differ from epoch to epoch (one mega-batch spanning the epoch
        would give the same length-sorted batches every time)."""
        return max(1, min(self.mega, self.steps_per_epoch // 4))

    def _mega_batches(self, epoch: int, m: int) -> list[np.ndarray]:
        if self._mega_cache is not None and self._mega_cache[0] == (epoch, m):
            return self._mega_cache[1]
        size = self.mega_batches * self.batch_size
        rows = self._permutation(epoch)[m * size:(m + 1) * size]
        lens = np.asarray(self.row_len[rows])
        order = rows[np.argsort(lens, kind="stable")]  # ties keep the permutation's (random) order
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        shuffled = [batches[i] for i in np.random.default_rng([self.seed, epoch, m, 1]).permutation(len(batches))]
        self._mega_cache = ((epoch, m), shuffled)
        return shuffled

    def global_batch(self, step: int) -> np.ndarray:
        """Pair indices of optimizer step `step` (0-based)."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} outside the plan's {self.steps} steps")
        epoch, k = divmod(step, self.steps_per_epoch)
        if not self.group_by_length:
            return self._permutation(epoch)[k * self.batch_size:(k + 1) * self.batch_size].astype(np.int64)
        return self._mega_batches(epoch, k // self.mega_batches)[k % self.mega_batches].astype(np.int64)

    def micro_batches(self, step: int) -> list[np.ndarray]:
        """Every micro-batch of step `step`, rank 0's first (empty arrays: stand-ins)."""
        b = self.global_batch(step)
        if self.pieces:
            return balanced_split(b, np.asarray(self.row_len[b]), self.pieces)
        return [m for per in split_for_ranks(b, np.asarray(self.row_len[b]), self.width, self.world, self.token_budget,
                                             self.packed) for m in per]

    def rank_micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        """The micro-batches rank `rank` trains on at step `step` (the same count on every rank)."""
        micro = self.micro_batches(step)
        per = len(micro) // self.world
        return micro[rank * per:(rank + 1) * per]

    def consumed(self, step: int) -> int:
        """Pairs trained on before step `step` (the loader position in pairs, for the record)."""
        full, k = divmod(step, self.steps_per_epoch)
        return full * self.n + min(k * self.batch_size, self.n)


@dataclass
class RankBatchSampler:
    """The DataLoader `batch_sampler` of one rank: for each step from `start`, its micro-batches, each as (pair
    indices, weights, pairs in the global batch, index of the micro-batch in the step, micro-batches in the step).
    An empty micro-batch becomes one stand-in pair of weight 0, so every rank still runs the same forwards and
    FSDP collectives."""

    plan: GlobalBatchPlan
    rank: int
    start: int = 0

    def __iter__(self):
        for step in range(self.start, self.plan.steps):
            batch = self.plan.global_batch(step)
            mine = self.plan.rank_micro_batches(step, self.rank)
            for a, idx in enumerate(mine):
                if len(idx):
                    yield idx, [1.0] * len(idx), len(batch), a, len(mine)
                else:
                    yield batch[:1], [0.0], len(batch), a, len(mine)
