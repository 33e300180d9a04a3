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
from itertools import accumulate

import numpy as np

from pipelines.rm.model import RewardModel, RMTokenizer
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
    def __init__(self, rm: RewardModel | RMTokenizer, max_len: int = 512, policy: LengthPolicy | str = LengthPolicy.TRUNCATE):
        self.tok = rm.tokenizer
        self.decoder = rm.is_decoder
        self.max_len = max_len
        self.policy = LengthPolicy(policy)
        self.chat = self.decoder and getattr(self.tok, "chat_template", None) is not None

    def _strip_bos(self, text: str) -> str:
        bos = self.tok.bos_token
        return text[len(bos):] if bos and text.startswith(bos) else text

    def render(self, history: list[dict], response: str) -> tuple[list[int], int]:
        """(token ids of history + response, tokens of the rendered history)."""
        return self.render_many(history, [response])[0]

    def render_many(self, history: list[dict], responses: list[str]) -> list[tuple[list[int], int]]:
        """`render` for several responses to one history: the history is rendered once."""
        return self.render_batch([(history, responses)])[0]

    def render_batch(self, items: list[tuple[list[dict], list[str]]]) -> list[list[tuple[list[int], int]]]:
        """`render_many` for many histories at once: every text of the batch goes through one tokenizer call
        (tokenizing is most of the CPU time of scoring 40M pairs and of building a token store). Ids are exactly
        those of one call per text."""
        if not items:
            return []
        msgs = [[{"role": m["role"], "content": m["content"]} for m in h] for h, _ in items]
        if self.chat:
            heads, fulls = [], []
            for m, (_, responses) in zip(msgs, items):
                heads.append(self._strip_bos(self.tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)))
                fulls += [self._strip_bos(self.tok.apply_chat_template(m + [{"role": "assistant", "content": r}],
                                                                      tokenize=False)) for r in responses]
            return self._tokenize_rendered(heads, fulls, [len(rs) for _, rs in items])
        if self.decoder:  # a decoder without a chat template: plain transcript, EOS-terminated
            eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
            prefixes = self.tok([prompt_text(m) + "\nassistant: " for m in msgs], add_special_tokens=True)["input_ids"]
            bodies = iter(self.tok([r for _, rs in items for r in rs], add_special_tokens=False)["input_ids"])
            return [[(pids + next(bodies) + eos, len(pids)) for _r in rs] for pids, (_, rs) in zip(prefixes, items)]
        sep = self.tok.sep_token_id
        firsts = [prompt_text(m) for m, (_, rs) in zip(msgs, items) for _r in rs]
        seconds = [r for _, rs in items for r in rs]
        enc = iter(self.tok(firsts, seconds, add_special_tokens=True)["input_ids"]) if seconds else iter(())
        return [[(ids, ids.index(sep) + 1 if sep in ids else 1) for ids in (next(enc) for _r in rs)]
                for _, rs in items]

    @cached_property
    def _split(self):
        """How to tokenize a rendered history once for all its responses, or None where that would not give the ids
        of one call per full text. HF tokenizers split a text at special added tokens before normalizing and
        pre-tokenizing, and handle each piece alone: so the ids of `A + B`, where A ends with a special token that
        strips no whitespace, are ids(A) + ids(B) (the post-processor's BOS/EOS aside). Not so where a
        pre-tokenizer treats the text's first piece differently (Metaspace `prepend_scheme: first`) or a longer
        added token starts with a special one; then every text is tokenized whole."""
        import json
        import re

        if not getattr(self.tok, "is_fast", False):
            return None
        added = list(self.tok.added_tokens_decoder.values())
        specials = [t.content for t in added if t.special and not t.rstrip and t.content]
        if not specials or any(a.content != s and a.content.startswith(s) for a in added for s in specials):
            return None
        if '"prepend_scheme":"first"' in json.dumps(json.loads(self.tok.backend_tokenizer.to_str()), separators=(",", ":")):
            return None
        with_sp = self.tok("a", add_special_tokens=True)["input_ids"]
        bare = self.tok("a", add_special_tokens=False)["input_ids"]
        at = next((i for i in range(len(with_sp) - len(bare) + 1) if with_sp[i:i + len(bare)] == bare), None)
        if at is None:
            return None
        post = with_sp[at + len(bare):]
        return re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))), post

    def _tokenize_rendered(self, heads: list[str], fulls: list[str], counts: list[int]) -> list[list[tuple[list[int], int]]]:
        """Ids of each full text and its history's token count (the token holding the first character after the
        history). Where `_split` allows, each history is tokenized once up to its last special token and only the
        rest of each full text after it: a pair's history is most of its text, so this halves the tokenizing of
        multi-turn data. Elsewhere each full text is tokenized whole and the history's count read off it."""
        plan = self._split
        cuts = [0] * len(heads)
        if plan is not None:
            pattern, post = plan
            j = 0
            for i, (h, k) in enumerate(zip(heads, counts)):
                last = None
                for last in pattern.finditer(h):
                    pass
                if last is not None and all(len(f) > len(h) and f.startswith(h) for f in fulls[j:j + k]):
                    cuts[i] = last.end()
                j += k
        out: list[list[tuple[list[int], int]]] = []
        split = [i for i, c in enumerate(cuts) if c]
        whole = [i for i, c in enumerate(cuts) if not c]
        firsts = [0, *accumulate(counts)]  # each item's first full text
        result: dict[int, list[list]] = {}
        redo: list[tuple[int, int]] = []  # (item, response) whose history count the encoding does not give
        if split:
            _, post = plan
            # the backend's own batch call (what the tokenizer's __call__ wraps, without converting every
            # encoding to a dict): Encoding.ids and Encoding.char_to_token are all this needs
            backend = self.tok.backend_tokenizer
            head_ids = [e.ids for e in backend.encode_batch([heads[i][:cuts[i]] for i in split],
                                                            add_special_tokens=True)]
            tails = backend.encode_batch([fulls[j][cuts[i]:] for i in split for j in range(firsts[i], firsts[i + 1])],
                                         add_special_tokens=False)
            t = 0
            for i, hid in zip(split, head_ids):
                if post and hid[-len(post):] == post:
                    hid = hid[:-len(post)]
                group = []
                for _ in range(counts[i]):
                    n = tails[t].char_to_token(len(heads[i]) - cuts[i])
                    if n is None:  # the character maps to no token (offsets trimmed of whitespace)
                        redo.append((i, len(group)))
                    group.append([hid + tails[t].ids + post, None if n is None else len(hid) + n])
                    t += 1
                result[i] = group
        if whole:
            texts = [fulls[j] for i in whole for j in range(firsts[i], firsts[i + 1])]
            enc = self.tok(texts, add_special_tokens=True)
            t = 0
            for i in whole:
                group = []
                for _ in range(counts[i]):
                    n = None
                    if enc.is_fast and len(texts[t]) > len(heads[i]) and texts[t].startswith(heads[i]):
                        n = enc.char_to_token(t, len(heads[i]))
                    if n is None:
                        redo.append((i, len(group)))
                    group.append([enc["input_ids"][t], n])
                    t += 1
                result[i] = group
        if redo:  # a slow tokenizer, or a template whose history is not a prefix: tokenize it and compare
            todo = sorted({i for i, _ in redo})
            hids = dict(zip(todo, self.tok([heads[i] for i in todo], add_special_tokens=True)["input_ids"]))
            for i, k in redo:
                ids, pids = result[i][k][0], hids[i]
                n, top = 0, min(len(ids), len(pids))
                while n < top and ids[n] == pids[n]:
                    n += 1
                result[i][k][1] = n
        for i in range(len(heads)):
            out.append([(ids, n) for ids, n in result[i]])
        return out

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
        if self.max_len < head + tail + 1:  # a setting error, not a text's: no text could be scored
            raise ValueError(f"max_len {self.max_len} is shorter than the {head + tail} special tokens this model "
                             "reads around a response")
        # the prompt's tail gives way first (down to nothing) so that at least one response token stays: a text is
        # always scored and counted as cut, never refused
        keep = max(0, min(prefix - head, PROMPT_TAIL, self.max_len - head - tail - 1))
        budget = self.max_len - head - keep - tail
        out = ids[:head] + ids[prefix - keep:prefix] + ids[prefix:len(ids) - tail][:budget] + ids[len(ids) - tail:]
        return Encoded(out, head + keep, truncated=len(ids) - len(out)), "response"

    def suffix_len(self, history: list[dict]) -> int:
        """Tokens the rendering puts after the response: a one-token sentinel response shows them (an empty one
        would not: a tokenizer drops an empty text pair together with its [SEP])."""
        ids, prefix = self.render(history, "x")
        return max(len(ids) - prefix - len(self.tok("x", add_special_tokens=False)["input_ids"]), 0)

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


def shared_prefix_len(seqs: list, prefix_lens: list[int]) -> int:
    """Leading tokens every sequence shares (the history), leaving at least one token of each. Works on lists and
    numpy arrays alike."""
    arrs = [np.asarray(s) for s in seqs]
    k = min(prefix_lens)
    if any(not np.array_equal(a[:k], arrs[0][:k]) for a in arrs[1:]):
        top = min(len(a) for a in arrs)
        diff = np.zeros(top, dtype=bool)
        for a in arrs[1:]:
            diff |= a[:top] != arrs[0][:top]
        k = int(np.argmax(diff)) if diff.any() else top
    return int(min(k, *(len(a) - 1 for a in arrs)))


@dataclass
class EncodedPair:
    """A chosen response and its rejected one(s) (several for best-of-N data, `more`), encoded on one history,
    with the pair's margin when the data carries one. Ids may be lists (fresh from the renderer) or int32 numpy
    arrays (read from a token store, which also gives `shared_len`)."""

    pair_id: str
    chosen: Encoded
    rejected: Encoded
    more: list[Encoded] = field(default_factory=list)  # further rejected responses (K-negative / listwise losses)
    margin: float | None = None
    shared_len: int | None = None  # precomputed `shared` (token store)

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
        if self.shared_len is not None:
            return self.shared_len
        return shared_prefix_len([e.ids for e in self.sequences], [e.prefix_len for e in self.sequences])

    def row_len(self, layout: str) -> int:
        """Length of this pair's padded row(s) in a layout: `pairs` pads every sequence to the longest one,
        `shared_prefix` lays the history once then every response in one row, `packed` concatenates all."""
        return row_length(layout, self.tokens, max(len(e.ids) for e in self.sequences), self.shared,
                          len(self.sequences))


def row_length(layout: str, tokens, max_seq, shared, n_seq):
    """`EncodedPair.row_len` on scalars or numpy arrays (the sampler groups millions of pairs by it)."""
    if layout == "shared_prefix":
        return tokens - shared * (n_seq - 1)
    if layout == "packed":
        return tokens
    return max_seq


ENCODE_CHUNK = 256  # rows per batched tokenizer call


def encode_rows(renderer: Renderer, rows: list[dict]) -> tuple[list[EncodedPair | None], LengthReport]:
    """One EncodedPair per row (None where the length policy refuses it). rows: dicts with pair_id, history,
    chosen, rejected, and optionally `rejected_more` (a list of further rejected responses) and `margin`."""
    out: list[EncodedPair | None] = []
    rep = LengthReport()
    for s in range(0, len(rows), ENCODE_CHUNK):
        chunk = rows[s:s + ENCODE_CHUNK]
        extras = [[x for x in (r.get("rejected_more") or []) if x is not None] for r in chunk]
        rendered = renderer.render_batch([(r["history"], [r["chosen"], r["rejected"], *x])
                                          for r, x in zip(chunk, extras)])
        for r, ren in zip(chunk, rendered):
            rep.total += 1
            try:
                enc = renderer._fit(ren)
            except OverLength:
                if renderer.policy is LengthPolicy.FAIL:
                    raise
                rep.dropped += 1
                rep.dropped_ids.append(r["pair_id"])
                out.append(None)
                continue
            rep.truncated += int(any(e.truncated for e in enc))
            margin = r.get("margin")
            out.append(EncodedPair(r["pair_id"], enc[0], enc[1], enc[2:], None if margin is None else float(margin)))
    return out, rep


def encode_pairs(renderer: Renderer, rows: list[dict]) -> tuple[list[EncodedPair], LengthReport]:
    """`encode_rows` without the refused rows (they are counted in the report, not silently lost)."""
    enc, rep = encode_rows(renderer, rows)
    return [e for e in enc if e is not None], rep
