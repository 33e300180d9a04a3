"""The canonical preference pair: one schema every stage reads and writes.

A pair is (history, chosen, rejected): `history` is every earlier turn as a list of {role, content} messages,
`chosen`/`rejected` are the two candidate final assistant turns. `pair_id` is the paper's global dedup key
(App. C.1): a hash of the normalized (history, chosen, rejected) triple, so the same pair from two sources gets
the same id and re-ingesting a source changes nothing.
"""

from __future__ import annotations

import enum
from typing import Callable

import polars as pl
import pyarrow as pa
import xxhash

from pipelines.chat import first_user_turn, prompt_text  # noqa: F401  (re-exported)

class LabelOrigin(str, enum.Enum):
    """Who decided which response is `chosen`."""

    DATASET = "dataset"  # the source dataset's own label
    HUMAN = "human"  # a human verdict in the review ledger
    LLM = "llm"  # an LLM judge ensemble
    RM = "rm"  # a reward model
    SIMULATED = "simulated"  # the offline simulated reviewer/judge (demo only)


HISTORY_DTYPE = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))


def normalize_expr(e: pl.Expr, nfc: bool = True) -> pl.Expr:
    """NFC, unified newlines, collapsed runs of spaces/tabs, stripped ends: formatting noise must not split a pair.

    Defined once as a polars expression so the per-row and columnar ingest paths hash identically. The regex
    only matches runs that change (two or more blanks, or a blank other than a space), so clean text costs a
    scan, not a rewrite. `nfc=False` is for rows known to be ASCII, where NFC is the identity.
    """
    if nfc:
        e = e.str.normalize("NFC")
    return (e.str.replace_all("\r\n", "\n", literal=True)
            .str.replace_all(r"[\t\r\f\v][ \t\r\f\v]*| [ \t\r\f\v]+", " ").str.strip_chars())


def _strip(e: pl.Expr) -> pl.Expr:
    return e.str.strip_chars()


def _key(norm: Callable[[pl.Expr], pl.Expr], history: str = "history", chosen: str = "chosen",
         rejected: str = "rejected") -> pl.Expr:
    turn = pl.element().struct.field("role") + "\x1f" + norm(pl.element().struct.field("content"))
    hist = pl.col(history).list.eval(turn).list.join("\x1e")
    return pl.concat_str([hist.fill_null(""), norm(pl.col(chosen)), norm(pl.col(rejected))], separator="\x1d")


def _comparison_key(norm: Callable[[pl.Expr], pl.Expr]) -> pl.Expr:
    turn = pl.element().struct.field("role") + "\x1f" + norm(pl.element().struct.field("content"))
    hist = pl.col("history").list.eval(turn).list.join("\x1e")
    a, b = norm(pl.col("chosen")), norm(pl.col("rejected"))
    lo = pl.when(a <= b).then(a).otherwise(b)
    hi = pl.when(a <= b).then(b).otherwise(a)
    return pl.concat_str([pl.lit("cmp\x1d"), hist.fill_null(""), lo, hi], separator="\x1d")


def key_expr(history: str = "history", chosen: str = "chosen", rejected: str = "rejected",
             nfc: bool = True) -> pl.Expr:
    """The canonical dedup key: roles and normalized texts joined with ASCII separator characters."""
    return _key(lambda e: normalize_expr(e, nfc), history, chosen, rejected)


def comparison_key_expr(nfc: bool = True) -> pl.Expr:
    """The orientation-free key: the history, then the two normalized responses in sorted order, so (h, A, B) and
    (h, B, A) are one comparison."""
    return _comparison_key(lambda e: normalize_expr(e, nfc))


def hash_keys(keys: pl.Series) -> pl.Series:
    """XXH3-128 (frozen spec, 128 bits: collisions negligible at 10^10 pairs), ~8x faster than blake2b here,
    which matters on the ingest hot path. Not a security hash: ids are keys, not secrets. Hex of the canonical
    (big-endian) digest, i.e. `xxh3_128_hexdigest`; the hex is made column-wise from the joined digests."""
    if keys.null_count():
        raise ValueError(f"{keys.null_count()} pair key(s) are null: a pair id needs every text of the pair")
    h = xxhash.xxh3_128_digest
    digests = b"".join([h(k) for k in keys.cast(pl.Binary).to_list()])
    arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), keys.len(), [None, pa.py_buffer(digests)])
    return pl.Series(keys.name, arr.cast(pa.binary())).bin.encode("hex")


# Bytes that make `normalize_expr` rewrite an ASCII text: with none of them (and no two spaces in a row), the text
# is only stripped, so its key is built without the regex (5x cheaper; the regex is most of an id's cost).
_BLANK_RUN_MARKERS = ("  ", "\t", "\r", "\x0b", "\x0c")


def _ids(df: pl.DataFrame, key: Callable[[Callable[[pl.Expr], pl.Expr]], pl.Expr]) -> pl.Series:
    """Ids of every row, by the definition `key(normalize_expr)` hashed. Every row's key is first built with its
    texts only stripped; a row whose stripped key is not ASCII (NFC may change it) or still holds a blank-run
    marker is rebuilt by the full definition. For the rest the two are equal: NFC is the identity on ASCII, and
    with no marker left inside a stripped text the regex can only have rewritten whitespace that strip removes
    (tests/test_schema_formats.py checks this against the definition on adversarial texts)."""
    if df.height == 0:
        return pl.Series("id", [], dtype=pl.String)
    keys = df.select(k=key(_strip))["k"]
    redo = keys.str.len_bytes() != keys.str.len_chars()
    for m in _BLANK_RUN_MARKERS:
        redo = redo | keys.str.contains(m, literal=True)
    redo = redo.fill_null(True)
    if redo.any():
        idx = redo.arg_true()
        keys = keys.scatter(idx, df[idx].select(k=key(normalize_expr))["k"])
    return hash_keys(keys).alias("id")


def pair_ids(df: pl.DataFrame) -> pl.Series:
    """pair_id of every row of a frame with history/chosen/rejected columns (128-bit XXH3, hex)."""
    return _ids(df, _key)


def comparison_ids(df: pl.DataFrame) -> pl.Series:
    """comparison_id of every row: one id for a comparison whichever response a source labelled chosen (the seed
    split, held-out exclusion and the leak check go by it; `pair_id` keeps the orientation)."""
    return _ids(df, _comparison_key)


def _frame(history: list[dict[str, str]], chosen: str, rejected: str) -> pl.DataFrame:
    return pl.DataFrame({"history": [history], "chosen": [chosen], "rejected": [rejected]},
                        schema={"history": HISTORY_DTYPE, "chosen": pl.String, "rejected": pl.String})


def pair_id(history: list[dict[str, str]], chosen: str, rejected: str) -> str:
    return pair_ids(_frame(history, chosen, rejected))[0]


def comparison_id(history: list[dict[str, str]], chosen: str, rejected: str) -> str:
    return comparison_ids(_frame(history, chosen, rejected))[0]


def item_pair_ids(items: pl.DataFrame) -> pl.DataFrame:
    """benchmark, pair_id of every comparison (chosen x rejected) of benchmark items, as ingest hashes a pair, in
    both orientations (a training set may hold a pair flipped). Here, not in evaluate: ingest's decontamination
    needs it too."""
    if items.height == 0:
        return pl.DataFrame(schema={"benchmark": pl.String, "pair_id": pl.String})
    pairs = items.select("benchmark", "history", "chosen", "rejected").explode("chosen").explode("rejected")
    flipped = pairs.select("benchmark", "history", chosen="rejected", rejected="chosen")
    return pl.concat([f.with_columns(pair_id=pair_ids(f)).select("benchmark", "pair_id")
                      for f in (pairs, flipped)]).unique()


MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

RAW_PAIRS_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("history", pa.list_(MESSAGE_TYPE)),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("source", pa.string()),
        ("shard", pa.string()),
        ("source_row", pa.int64()),
        ("label_origin", pa.string()),
        ("category_hint", pa.string()),  # a category the source itself states (may be null)
        ("margin", pa.float64()),  # a preference strength the source states (UltraFeedback rating gap; a TRL
                                   # `margin` column); null when it states none. Feeds the margin_bt loss
        ("ingest_run_id", pa.string()),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
    ]
)

class Reason(str, enum.Enum):
    """Why a row is in `quarantine` (the reason code it carries). Here, with the table's schema, because ingest and
    every later stage that refuses pairs (pipelines.pool.quarantine_pairs) write it."""

    UNDECODABLE = "undecodable"  # not UTF-8, not JSON, not an object
    MISSING_FIELD = "missing_field"
    NULL_FIELD = "null_field"
    MALFORMED = "malformed"  # wrong types, unknown roles, no turns
    HISTORY_MISMATCH = "history_mismatch"  # chosen/rejected disagree before the final turn
    EMPTY_TEXT = "empty_text"
    IDENTICAL = "identical_responses"
    BAD_TEXT = "bad_text"  # NUL bytes or U+FFFD replacement characters (mis-decoded upstream)
    TOO_LONG = "too_long"
    BAD_LABEL = "bad_label"
    CONTAMINATED = "contaminated"  # shares a 13-gram with a benchmark prompt
    # refused after ingest, by a later stage (pipelines.pool.quarantine_pairs)
    OVER_LENGTH = "over_length"  # a response alone longer than the RM's max_len: cannot be scored
    NON_FINITE = "non_finite"  # an RM returned NaN or inf for it
    ANNOTATION_FAILED = "annotation_failed"  # no valid attributes after every retry


QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("shard", pa.string()),
        ("source_row", pa.int64()),
        ("stage", pa.string()),  # which stage refused it: ingest, decontaminate, annotate, ...
        ("reason", pa.string()),  # a reason code: Reason
        ("detail", pa.string()),
        ("payload", pa.string()),  # the raw row as JSON, so nothing is lost
        ("pair_id", pa.string()),  # when one could be computed
        ("run_id", pa.string()),
        ("quarantined_at", pa.timestamp("us", tz="UTC")),
    ]
)

DUPLICATES_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("shard", pa.string()),
        ("source_row", pa.int64()),
        ("pair_id", pa.string()),
        ("kept_source", pa.string()),
        ("kept_shard", pa.string()),
        ("kept_source_row", pa.int64()),
        ("run_id", pa.string()),
    ]
)
