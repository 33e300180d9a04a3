"""13-gram decontamination against benchmark first-turn prompts (paper App. C.1, after N. Lambert's script).

A pair is contaminated when any 13-gram of its conversation history (lower-cased word tokens) appears in the
first user turn of a benchmark prompt. The benchmark prompts are an input table, so adding a benchmark is a
data change, not a code change.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

N = 13
_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _h(gram: tuple[str, ...]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(gram).encode(), digest_size=8).digest(), "little")


def ngram_hashes(text: str, n: int = N) -> set[int]:
    w = words(text)
    return {_h(tuple(w[i:i + n])) for i in range(len(w) - n + 1)}


@dataclass
class NgramIndex:
    """Hashes of every 13-gram of the benchmark prompts, with the benchmark each came from."""

    n: int = N
    owner: dict[int, str] = field(default_factory=dict)

    @classmethod
    def build(cls, prompts: list[tuple[str, str]], n: int = N) -> "NgramIndex":
        idx = cls(n=n)
        for benchmark, prompt in prompts:
            for h in ngram_hashes(prompt, n):
                idx.owner.setdefault(h, benchmark)
        return idx

    def __len__(self) -> int:
        return len(self.owner)

    def match(self, text: str) -> str | None:
        """The benchmark sharing a 13-gram with `text`, or None."""
        if not self.owner:
            return None
        w = words(text)
        for i in range(len(w) - self.n + 1):
            b = self.owner.get(_h(tuple(w[i:i + self.n])))
            if b is not None:
                return b
        return None
