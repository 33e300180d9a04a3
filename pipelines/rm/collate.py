"""From encoded pairs to the tensors of one forward pass, for each batch layout (see pipelines.rm.train).

Collation is separate from the forward so it can run in DataLoader workers, beside the training step: a worker
turns the pairs it fetched from the token store into CPU tensors; the trainer moves them to the device and runs
the model. Every layout lays out the scores it reads in one order: the chosen response of each pair, then each
pair's rejected responses in turn; `rejected_index` says where pair b's k-th rejected score sits in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipelines.rm.data import Encoded, EncodedPair


@dataclass
class Batch:
    layout: str
    inputs: dict[str, torch.Tensor]  # the model's keyword inputs (CPU until `to`)
    rejected_index: torch.Tensor  # [B, K] position of each rejected score in the flat order (0 where masked)
    mask: torch.Tensor  # [B, K] which rejected are real
    weight: torch.Tensor  # [B] 1 for a real pair, 0 for the stand-in of an empty micro-batch
    margin: torch.Tensor  # [B] the pair's stated margin (NaN where none)
    tokens: int  # real tokens of the real pairs
    pair_ids: list[str] = field(default_factory=list)
    n_global: int = 0  # pairs in the global batch this micro-batch belongs to (the loss divides by it)
    reads: torch.Tensor | None = None  # flat positions to read scores at (shared_prefix, packed)
    # shared_prefix: [B, L] block of each token (0 history, j the j-th response, -1 padding); packed: [1, T] the
    # sequence of each token. Linear in the tokens: the attention pattern is built from it on the device
    # (pipelines.rm.attention), never as an L x L tensor here
    segment: torch.Tensor | None = None
    micro_index: int = 0  # this micro-batch's place in its optimizer step
    micro_count: int = 1  # micro-batches of this rank in that step

    @property
    def n_pairs(self) -> int:
        return int(self.weight.shape[0])

    def _map(self, fn) -> "Batch":
        mv = lambda t: None if t is None else fn(t)  # noqa: E731
        return Batch(self.layout, {k: mv(v) for k, v in self.inputs.items()}, mv(self.rejected_index), mv(self.mask),
                     mv(self.weight), mv(self.margin), self.tokens, self.pair_ids, self.n_global, mv(self.reads),
                     mv(self.segment), self.micro_index, self.micro_count)

    def to(self, device: torch.device) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self, device: str | None = None) -> "Batch":
        """Page-locked copies (what DataLoader(pin_memory=True) calls on a custom batch type): the host-to-GPU
        copy in `to(..., non_blocking=True)` is then asynchronous."""
        return self._map(lambda t: t.pin_memory())


def layout_order(pairs: list[EncodedPair]) -> list[Encoded]:
    return [p.chosen for p in pairs] + [e for p in pairs for e in p.rejected_all]


def _rejected_index(pairs: list[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
    B = len(pairs)
    K = max(len(p.rejected_all) for p in pairs)
    idx = np.zeros((B, K), dtype=np.int64)
    mask = np.zeros((B, K), dtype=bool)
    i = B
    for b, p in enumerate(pairs):
        n = len(p.rejected_all)
        idx[b, :n] = np.arange(i, i + n)
        mask[b, :n] = True
        i += n
    return torch.from_numpy(idx), torch.from_numpy(mask)


def _common(pairs: list[EncodedPair], weight: list[float] | None):
    idx, mask = _rejected_index(pairs)
    w = torch.tensor(weight if weight is not None else [1.0] * len(pairs), dtype=torch.float32)
    margin = torch.tensor([np.nan if p.margin is None else p.margin for p in pairs], dtype=torch.float32)
    tokens = int(sum(p.tokens for p, x in zip(pairs, w.tolist()) if x > 0))
    return idx, mask, w, margin, tokens


def pad_sequences(encoded: list[Encoded], pad_id: int, segment_ids: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded input ids + attention mask, and for text-pair encoders (BERT-style) the segment ids (0 for
    [CLS] conversation [SEP], 1 for the response), exactly what the tokenizer gives a text pair."""
    n = max(len(e.ids) for e in encoded)
    ids = np.full((len(encoded), n), pad_id, dtype=np.int64)
    att = np.zeros((len(encoded), n), dtype=np.int64)
    types = np.zeros((len(encoded), n), dtype=np.int64) if segment_ids else None
    for i, e in enumerate(encoded):
        m = len(e.ids)
        ids[i, :m] = e.ids
        att[i, :m] = 1
        if types is not None:
            types[i, e.prefix_len:m] = 1
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(att)}
    if types is not None:
        out["token_type_ids"] = torch.from_numpy(types)
    return out


def collate_pairs(pairs: list[EncodedPair], pad_id: int, segment_ids: bool = False,
                  weight: list[float] | None = None) -> Batch:
    """Every sequence its own padded row: [chosen_1..chosen_B, rejected of pair 1.., of pair 2.., ...]."""
    idx, mask, w, margin, tokens = _common(pairs, weight)
    return Batch("pairs", pad_sequences(layout_order(pairs), pad_id, segment_ids), idx, mask, w, margin, tokens,
                 [p.pair_id for p in pairs])


def collate_shared_prefix(pairs: list[EncodedPair], pad_id: int, weight: list[float] | None = None) -> Batch:
    """One row per pair: [history | chosen | rejected_1 | ...]; each response block attends to the history and
    itself only, its positions continuing from the history."""
    idx, mask, w, margin, tokens = _common(pairs, weight)
    rows, meta = [], []
    for p in pairs:
        k = p.shared
        blocks = [np.asarray(e.ids[k:]) for e in p.sequences]
        rows.append(np.concatenate([np.asarray(p.chosen.ids[:k]), *blocks]))
        meta.append((k, [len(blk) for blk in blocks]))
    L = max(len(x) for x in rows)
    B = len(rows)
    ids = np.full((B, L), pad_id, dtype=np.int64)
    pos = np.zeros((B, L), dtype=np.int64)
    segment = np.full((B, L), -1, dtype=np.int32)
    chosen_reads, rejected_reads = [], []
    for b, (row, (k, lens)) in enumerate(zip(rows, meta)):
        n = len(row)
        ids[b, :n] = row
        pos[b, :k] = np.arange(k)
        segment[b, :k] = 0
        start, ends = k, []
        for j, m in enumerate(lens, 1):
            pos[b, start:start + m] = np.arange(k, k + m)  # every response continues from the history ...
            segment[b, start:start + m] = j  # ... and sees it and itself only (pipelines.rm.attention)
            start += m
            ends.append(b * L + start - 1)
        chosen_reads.append(ends[0])
        rejected_reads += ends[1:]
    reads = torch.tensor(chosen_reads + rejected_reads, dtype=torch.long)
    return Batch("shared_prefix", {"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(pos)}, idx,
                 mask, w, margin, tokens, [p.pair_id for p in pairs], reads=reads, segment=torch.from_numpy(segment))


def collate_packed(pairs: list[EncodedPair], weight: list[float] | None = None) -> Batch:
    """Padding-free: every sequence of the micro-batch back to back in one row, positions restarting at each
    sequence; rewards read at each sequence's last token."""
    idx, mask, w, margin, tokens = _common(pairs, weight)
    seqs = [np.asarray(e.ids) for e in layout_order(pairs)]
    ids = np.concatenate(seqs).astype(np.int64)[None]
    pos = np.concatenate([np.arange(len(s)) for s in seqs])[None]
    reads = torch.from_numpy(np.cumsum([len(s) for s in seqs]) - 1)
    segment = np.repeat(np.arange(len(seqs), dtype=np.int32), [len(s) for s in seqs])[None]
    return Batch("packed", {"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(pos)}, idx, mask,
                 w, margin, tokens, [p.pair_id for p in pairs], reads=reads, segment=torch.from_numpy(segment))


@dataclass
class Collator:
    """What a DataLoader calls on the pairs a worker fetched (picklable: runs in worker processes)."""

    layout: str
    pad_id: int
    segment_ids: bool = False

    def __call__(self, fetched: tuple) -> Batch:
        """fetched: (pairs, weights, pairs in the global batch[, micro-batch index, micro-batches in the step])."""
        pairs, weight, n_global, *where = fetched
        if self.layout == "pairs":
            b = collate_pairs(pairs, self.pad_id, self.segment_ids, weight)
        elif self.layout == "shared_prefix":
            b = collate_shared_prefix(pairs, self.pad_id, weight)
        elif self.layout == "packed":
            b = collate_packed(pairs, weight)
        else:
            raise ValueError(f"unknown layout {self.layout!r}")
        b.n_global = n_global
        if where:
            b.micro_index, b.micro_count = int(where[0]), int(where[1])
        return b
