"""Structural checks on canonical candidates; a refused one carries a reason code (pipelines.schema.Reason).

Checks run vectorized over a frame of candidates (history, chosen, rejected), so a 10M-row source is checked
at columnar speed; `check_candidate` is the same rule set for one pair.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from pipelines.lake import Lake
from pipelines.schema import HISTORY_DTYPE, RAW_PAIRS_SCHEMA, Reason
from pipelines.tables import RAW


class RowError(Exception):
    def __init__(self, reason: Reason, detail: str = ""):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def check_frame(df: pl.DataFrame, max_chars: int) -> pl.DataFrame:
    """Add `reason` and `detail` columns (null when the pair is usable), first failing rule wins."""
    contents = pl.col("history").list.eval(pl.element().struct.field("content"))
    roles = pl.col("history").list.eval(pl.element().struct.field("role"))
    c, r = pl.col("chosen"), pl.col("rejected")
    hist_text = contents.list.join("\n")
    null = c.is_null() | r.is_null() | pl.col("history").is_null() | contents.list.eval(pl.element().is_null()).list.any()
    user_nonempty = pl.col("history").list.eval(
        (pl.element().struct.field("role") == "user") & (pl.element().struct.field("content").str.strip_chars() != "")
    ).list.any()
    total = c.str.len_chars() + r.str.len_chars() + hist_text.str.len_chars()
    bad_chars = pl.any_horizontal([e.str.contains("[\x00\ufffd]") for e in (c, r, hist_text)])
    rules = [
        (null, Reason.NULL_FIELD, pl.lit("a text field is null")),
        (c.str.strip_chars() == "", Reason.EMPTY_TEXT, pl.lit("chosen is empty")),
        (r.str.strip_chars() == "", Reason.EMPTY_TEXT, pl.lit("rejected is empty")),
        (roles.list.len() == 0, Reason.EMPTY_TEXT, pl.lit("no history")),
        (~user_nonempty.fill_null(False), Reason.EMPTY_TEXT, pl.lit("no non-empty user turn in the history")),
        (c.str.strip_chars() == r.str.strip_chars(), Reason.IDENTICAL, pl.lit("chosen == rejected")),
        (total > max_chars, Reason.TOO_LONG, pl.format("{} characters > " + str(max_chars), total)),
        (bad_chars, Reason.BAD_TEXT, pl.lit("contains NUL or U+FFFD")),
    ]
    reason = pl.when(rules[0][0]).then(pl.lit(rules[0][1].value))
    detail = pl.when(rules[0][0]).then(rules[0][2])
    for cond, why, text in rules[1:]:
        reason = reason.when(cond).then(pl.lit(why.value))
        detail = detail.when(cond).then(text)
    return df.with_columns(reason=reason.otherwise(None), detail=detail.otherwise(None))


def check_candidate(history: list[dict[str, str]], chosen: str, rejected: str, max_chars: int) -> None:
    """Raise RowError when one pair cannot be used (same rules as `check_frame`)."""
    df = pl.DataFrame({"history": [history], "chosen": [chosen], "rejected": [rejected]},
                      schema={"history": HISTORY_DTYPE, "chosen": pl.String, "rejected": pl.String})
    row = check_frame(df, max_chars).row(0, named=True)
    if row["reason"] is not None:
        raise RowError(Reason(row["reason"]), row["detail"])


def has_canonical_schema(lake: Lake, table: str = RAW) -> bool:
    """Whether a written raw_pairs table has every canonical column with its canonical type (extra columns allowed:
    a table may carry more than the canonical ones)."""
    if not lake.exists(table):
        return False
    got = pa.schema(lake.delta(table).schema().to_arrow())
    return set(RAW_PAIRS_SCHEMA.names) <= set(got.names) and all(
        got.field(n).type == RAW_PAIRS_SCHEMA.field(n).type for n in RAW_PAIRS_SCHEMA.names)
