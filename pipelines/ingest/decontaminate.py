"""Decontamination against the benchmarks (paper App. C.1, after N. Lambert's script): 13-gram and exact-pair.

A pair is contaminated when any 13-gram of its conversation history (lower-cased \\w+ tokens) appears in the
first user turn of a benchmark prompt, or when the pair itself (either orientation) is a benchmark comparison: a
short prompt has no 13-gram, and an identical pair in training would be scored later as if unseen. The benchmark prompts are an input table, so adding a benchmark is a
data change, not a code change. Matching is vectorized in polars: n-grams are hashed with polars' own hash,
which is stable within a process (the index is rebuilt from the table in every run, never persisted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

N = 13


def words(text: str) -> list[str]:
    return pl.select(pl.lit(text).str.to_lowercase().str.extract_all(r"\w+")).item().to_list()


def ngram_hash_expr(text: pl.Expr, n: int = N) -> pl.Expr:
    """List of u64 hashes of every n-gram of the text's lower-cased word tokens."""
    toks = text.str.to_lowercase().str.extract_all(r"\w+")
    grams = toks.list.eval(pl.concat_str([pl.element().shift(-i) for i in range(n)], separator=" ").drop_nulls())
    return grams.list.eval(pl.element().hash(seed=13))


@dataclass
class NgramIndex:
    """Hashes of every 13-gram of the benchmark prompts, with the benchmark each came from."""

    n: int = N
    owners: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema={"h": pl.UInt64, "benchmark": pl.String}))
    pairs: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema={"pair_id": pl.String,
                                                                            "benchmark": pl.String}))

    @classmethod
    def build(cls, prompts: list[tuple[str, str]], n: int = N, pairs: pl.DataFrame | None = None) -> "NgramIndex":
        """prompts: (benchmark, first user turn); pairs: pair_id, benchmark of every benchmark comparison."""
        df = pl.DataFrame(prompts, schema={"benchmark": pl.String, "prompt": pl.String}, orient="row")
        owners = (df.select("benchmark", h=ngram_hash_expr(pl.col("prompt"), n)).explode("h").drop_nulls("h")
                  .unique("h", keep="first", maintain_order=True).select("h", "benchmark"))
        exact = (pairs.select("pair_id", "benchmark").unique("pair_id", keep="first") if pairs is not None
                 else cls.__dataclass_fields__["pairs"].default_factory())
        return cls(n=n, owners=owners, pairs=exact)

    def __len__(self) -> int:
        return self.owners.height + self.pairs.height

    def match_pairs(self, pair_ids: pl.Series) -> pl.Series:
        """For each pair id, the benchmark holding that exact comparison, or null."""
        return (pl.DataFrame({"pair_id": pair_ids}).join(self.pairs, on="pair_id", how="left",
                                                         maintain_order="left")["benchmark"])

    def match_frame(self, texts: pl.Series) -> pl.Series:
        """For each text, the benchmark it shares a 13-gram with, or null."""
        if self.owners.height == 0 or texts.len() == 0:
            return pl.Series("benchmark", [None] * texts.len(), dtype=pl.String)
        keys = self.owners["h"]
        df = pl.DataFrame({"text": texts}).with_row_index("i").with_columns(h=ngram_hash_expr(pl.col("text"), self.n))
        hit = df.filter(pl.col("h").list.eval(pl.element().is_in(keys.implode())).list.any())
        if hit.height == 0:
            return pl.Series("benchmark", [None] * texts.len(), dtype=pl.String)
        owner = (hit.select("i", "h").explode("h").join(self.owners, on="h", how="inner")
                 .group_by("i").agg(pl.col("benchmark").first()))
        return (pl.DataFrame({"i": pl.arange(0, texts.len(), eager=True).cast(pl.UInt32)})
                .join(owner, on="i", how="left", maintain_order="left")["benchmark"])

    def match(self, text: str) -> str | None:
        return self.match_frame(pl.Series([text], dtype=pl.String))[0]
