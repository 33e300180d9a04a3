"""Turning pairs into token ids, identically for training, scoring and evaluation.

Rendering rules (Skywork-Reward-V2 README): a decoder renders (history + response) with its own chat template,
no system prompt is injected, and a leading BOS string the template emits is stripped before tokenizing so the
tokenizer does not add a second one. An encoder gets [CLS] conversation [SEP] response [SEP].

Length policy (explicit, counted, never silent): `truncate` drops tokens from the left of the history so the
response survives; `drop` refuses over-length pairs; `fail` raises. A response that alone exceeds the budget is
refused under every policy but `fail`. A pair is truncated as one: both responses keep the same history (enough
is cut for the longer one), so the comparison is made on one context and the history stays a shared prefix.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property

from pipelines.rm.model import RewardModel
from pipelines.chat import prompt_text


PROMPT_TAIL = 16  # prompt tokens kept when a response alone overflows an evaluation budget (turn end + header)


class LengthPolicy(str, enum.Enum):
    TRUNCATE = "truncate"
    DROP = "drop"
    FAIL = "fail"


class OverLength(Exception):
    pass


@dataclass
class Encoded:
    ids: list[int]
    prefix_len: int  # tokens of the rendered history (shared by chosen and rejected)
    truncated: int = 0  # history tokens removed


@dataclass
class LengthReport:
    total: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {"pairs": self.total, "truncated": self.truncated, "dropped": self.dropped}


class Renderer:
    def __init__(self, rm: RewardModel, max_len: int = 512, policy: LengthPolicy | str = LengthPolicy.TRUNCATE):
        self.tok = rm.tokenizer
        self.decoder = rm.is_decoder
        self.max_len = max_len
        self.policy = LengthPolicy(policy)
        self.chat = self.decoder and getattr(self.tok, "chat_template", None) is not None

    def _strip_bos(self, text: str) -> str:
        bos = self.tok.bos_token
        return text[len(bos):] if bos and text.startswith(bos) else text

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=True)["input_ids"]

    def render(self, history: list[dict], response: str) -> tuple[list[int], int]:
        """(token ids of history + response, tokens of the rendered history)."""
        return self.render_many(history, [response])[0]

    def render_many(self, history: list[dict], responses: list[str]) -> list[tuple[list[int], int]]:
        """`render` for several responses to one history: the history is rendered once and the texts are
        tokenized in one batched call (scoring 40M pairs spends much of its CPU time here)."""
        msgs = [{"role": m["role"], "content": m["content"]} for m in history]
        if self.chat:
            fulls = [self._strip_bos(self.tok.apply_chat_template(msgs + [{"role": "assistant", "content": r}],
                                                                  tokenize=False)) for r in responses]
            prefix = self._strip_bos(self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
            enc = self.tok([prefix, *fulls], add_special_tokens=True)["input_ids"]
            pids, out = enc[0], []
            for ids in enc[1:]:
                n = 0
                while n < min(len(ids), len(pids)) and ids[n] == pids[n]:
                    n += 1
                out.append((ids, n))
            return out
        if self.decoder:  # a decoder without a chat template: plain transcript, EOS-terminated
            pids = self._ids(prompt_text(msgs) + "\nassistant: ")
            eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
            return [(pids + ids + eos, len(pids))
                    for ids in self.tok(list(responses), add_special_tokens=False)["input_ids"]]
        sep = self.tok.sep_token_id
        text = prompt_text(msgs)
        return [(ids, ids.index(sep) + 1 if sep in ids else 1)
                for ids in self.tok([text] * len(responses), list(responses), add_special_tokens=True)["input_ids"]]

    def encode(self, history: list[dict], response: str) -> Encoded:
        ids, prefix = self.render(history, response)
        return self._fit([(ids, prefix)])[0]

    def encode_for_eval(self, history: list[dict], response: str) -> tuple[Encoded, str]:
        """One (history, response) for scoring a benchmark, never refused: returns (encoded, how) with how =
        'none' | 'history' (the history was cut from the left) | 'response' (the response alone does not fit: the
        history is cut to the last PROMPT_TAIL prompt tokens — the turn boundary and assistant header — and the
        response's end is cut). Either way the special tokens the model reads survive: the leading BOS/CLS and the
        tokens the template puts after the response (EOS, SEP, end-of-turn), so the score is read where it always
        is."""
        ids, prefix = self.render(history, response)
        if len(ids) <= self.max_len:
            return Encoded(ids, prefix), "none"
        head = 1 if ids and ids[0] in (self.tok.bos_token_id, self.tok.cls_token_id) else 0
        excess = len(ids) - self.max_len
        if excess <= prefix - head - 1:
            return Encoded(ids[:head] + ids[head + excess:], prefix - excess, truncated=excess), "history"
        tail = self.suffix_len(history)
        keep = min(prefix - head, PROMPT_TAIL)
        budget = self.max_len - head - keep - tail
        if budget < 1:
            raise OverLength(f"max_len {self.max_len} leaves no room for a response")
        out = ids[:head] + ids[prefix - keep:prefix] + ids[prefix:len(ids) - tail][:budget] + ids[len(ids) - tail:]
        return Encoded(out, head + keep, truncated=len(ids) - len(out)), "response"

    def suffix_len(self, history: list[dict]) -> int:
        """Tokens the rendering puts after the response: a one-token sentinel response shows them (an empty one
        would not: a tokenizer drops an empty text pair together with its [SEP])."""
        ids, prefix = self.render(history, "x")
        return max(len(ids) - prefix - len(self.tok("x", add_special_tokens=False)["input_ids"]), 0)

    def encode_pair(self, history: list[dict], chosen: str, rejected: str) -> tuple[Encoded, Encoded]:
        c, r = self._fit(self.render_many(history, [chosen, rejected]))
        return c, r

    def _fit(self, rendered: list[tuple[list[int], int]]) -> list[Encoded]:
        """Apply the length policy to renderings of one history; all lose the same history tokens."""
        longest = max(len(ids) for ids, _ in rendered)
        if longest <= self.max_len:
            return [Encoded(ids, prefix) for ids, prefix in rendered]
        if self.policy is LengthPolicy.FAIL:
            raise OverLength(f"{longest} tokens > max_len {self.max_len}")
        if self.policy is LengthPolicy.DROP:
            raise OverLength("drop")
        excess = longest - self.max_len
        out = []
        for ids, prefix in rendered:
            head = 1 if ids and ids[0] in (self.tok.bos_token_id, self.tok.cls_token_id) else 0
            if excess > prefix - head - 1:
                raise OverLength("response alone exceeds max_len")
            # cut from the left of the history, keeping BOS/CLS
            out.append(Encoded(ids[:head] + ids[head + excess:], prefix - excess, truncated=excess))
        return out


@dataclass
class EncodedPair:
    """A chosen response and its rejected one(s) (several for best-of-N data, `more`), encoded on one history,
    with the pair's margin when the data carries one."""

    pair_id: str
    chosen: Encoded
    rejected: Encoded
    more: list[Encoded] = field(default_factory=list)  # further rejected responses (K-negative / listwise losses)
    margin: float | None = None

    @property
    def rejected_all(self) -> list[Encoded]:
        return [self.rejected, *self.more]

    @property
    def sequences(self) -> list[Encoded]:
        return [self.chosen, *self.rejected_all]

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.sequences)

    @cached_property  # read by batch grouping and by every shared-prefix forward
    def shared(self) -> int:
        """Leading tokens every response's sequence shares (the history; at least one token of each is left)."""
        seqs = [e.ids for e in self.sequences]
        k = min(e.prefix_len for e in self.sequences)
        if any(s[:k] != seqs[0][:k] for s in seqs[1:]):
            k = 0
            while k < min(map(len, seqs)) - 1 and all(s[k] == seqs[0][k] for s in seqs[1:]):
                k += 1
        return min(k, *(len(s) - 1 for s in seqs))

    def row_len(self, layout: str) -> int:
        """Length of this pair's padded row(s) in a layout: `pairs` pads every sequence to the longest one,
        `shared_prefix` lays the history once then every response in one row, `packed` concatenates all."""
        if layout == "shared_prefix":
            return self.tokens - self.shared * (len(self.sequences) - 1)
        if layout == "packed":
            return self.tokens
        return max(len(e.ids) for e in self.sequences)


def encode_pairs(renderer: Renderer, rows: list[dict]) -> tuple[list[EncodedPair], LengthReport]:
    """rows: dicts with pair_id, history, chosen, rejected, and optionally `rejected_more` (a list of further
    rejected responses) and `margin`. Over-length pairs are counted, not silently lost."""
    out, rep = [], LengthReport()
    for r in rows:
        rep.total += 1
        extra = [x for x in (r.get("rejected_more") or []) if x is not None]
        try:
            enc = renderer._fit(renderer.render_many(r["history"], [r["chosen"], r["rejected"], *extra]))
        except OverLength:
            if renderer.policy is LengthPolicy.FAIL:
                raise
            rep.dropped += 1
            rep.dropped_ids.append(r["pair_id"])
            continue
        rep.truncated += int(any(e.truncated for e in enc))
        margin = r.get("margin")
        out.append(EncodedPair(r["pair_id"], enc[0], enc[1], enc[2:], None if margin is None else float(margin)))
    return out, rep


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """Plain shuffled batches, padded to their longest member: what TRL and most trainers do (a benchmark peer)."""
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def length_grouped_batches(items: list[EncodedPair], batch_size: int, shuffle_seed: int | None = None,
                           layout: str = "pairs") -> list[list[int]]:
    """Batches of similar row length in `layout` (little padding where varlen kernels are absent), in shuffled
    batch order."""
    import random

    lens = [p.row_len(layout) for p in items]
    order = sorted(range(len(items)), key=lambda i: (lens[i], items[i].tokens))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(batches)
    return batches
