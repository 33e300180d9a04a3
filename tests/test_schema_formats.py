import pytest

from pipelines.ingest.checks import RowError, check_candidate
from pipelines.ingest.formats import ParseStats, detect_format, parse_hh_transcript, PARSERS, apply_mapping
from pipelines.schema import Reason, pair_id


def test_pair_id_is_stable_under_formatting_noise_and_sensitive_to_order():
    h = [{"role": "user", "content": "Hi  there\r\n"}]
    a = pair_id(h, "Hello!", "Go away.")
    assert a == pair_id([{"role": "user", "content": "Hi there"}], " Hello! ", "Go away.")
    assert a != pair_id(h, "Go away.", "Hello!")  # swapping the label is a different pair
    assert a != pair_id([{"role": "assistant", "content": "Hi there"}], "Hello!", "Go away.")
    assert len(a) == 32


def test_hh_transcript_becomes_messages():
    msgs = parse_hh_transcript("\n\nHuman: What's up?\n\nAssistant: Not much.\n\nHuman: ok\n\nAssistant: bye")
    assert msgs == [{"role": "user", "content": "What's up?"}, {"role": "assistant", "content": "Not much."},
                    {"role": "user", "content": "ok"}, {"role": "assistant", "content": "bye"}]


def test_hh_pair_shares_history_and_splits_final_turn():
    rec = {"chosen": "\n\nHuman: q\n\nAssistant: a1\n\nHuman: q2\n\nAssistant: good",
           "rejected": "\n\nHuman: q\n\nAssistant: a1\n\nHuman: q2\n\nAssistant: bad"}
    assert detect_format(rec) == "hh"
    (c,) = PARSERS["hh"](rec, ParseStats())
    assert [m["role"] for m in c.history] == ["user", "assistant", "user"]
    assert (c.chosen, c.rejected) == ("good", "bad")
    rec["rejected"] = "\n\nHuman: other\n\nAssistant: bad"
    with pytest.raises(RowError) as e:
        PARSERS["hh"](rec, ParseStats())
    assert e.value.reason is Reason.HISTORY_MISMATCH


def test_trl_string_and_message_forms():
    (c,) = PARSERS["trl"]({"prompt": "p", "chosen": "a", "rejected": "b"}, ParseStats())
    assert c.history == [{"role": "user", "content": "p"}]
    conv = [{"role": "user", "content": "p"}]
    (c,) = PARSERS["trl"]({"chosen": conv + [{"role": "assistant", "content": "a"}],
                           "rejected": conv + [{"role": "assistant", "content": "b"}]}, ParseStats())
    assert c.history == conv and c.chosen == "a"
    (c,) = PARSERS["trl"]({"prompt": conv, "chosen": [{"role": "assistant", "content": "a"}],
                           "rejected": [{"role": "assistant", "content": "b"}]}, ParseStats())
    assert c.rejected == "b"
    with pytest.raises(RowError) as e:
        PARSERS["trl"]({"chosen": "a", "rejected": "b"}, ParseStats())
    assert e.value.reason is Reason.MISSING_FIELD


def test_ultrafeedback_expands_by_rating_and_counts_ties():
    rec = {"instruction": "q", "completions": [
        {"response": "r1", "overall_score": 8}, {"response": "r2", "overall_score": 5},
        {"response": "r3", "annotations": {"a": {"Rating": "5"}, "b": {"Rating": 5}}},
        {"response": "r4", "overall_score": 9}]}
    stats = ParseStats()
    cands = PARSERS[detect_format(rec)](rec, stats)
    assert stats.ties_dropped == 1  # r2 vs r3
    assert len(cands) == 5
    assert all((c.chosen, c.rejected) != ("r2", "r4") for c in cands)
    assert any((c.chosen, c.rejected) == ("r4", "r1") for c in cands)


def test_judgebench_labels():
    rec = {"question": "q", "response_A": "A", "response_B": "B", "label": "B>A"}
    assert detect_format(rec) == "judgebench"
    (c,) = PARSERS["judgebench"](rec, ParseStats())
    assert (c.chosen, c.rejected) == ("B", "A")
    with pytest.raises(RowError) as e:
        PARSERS["judgebench"](dict(rec, label="A=B"), ParseStats())
    assert e.value.reason is Reason.BAD_LABEL


def test_column_mapping():
    rec = apply_mapping({"question": "q", "good": "a", "bad": "b"}, {"prompt": "question", "chosen": "good",
                                                                     "rejected": "bad"})
    assert detect_format(rec) == "trl"


@pytest.mark.parametrize("chosen,rejected,reason", [
    ("", "x", Reason.EMPTY_TEXT), ("same", "same", Reason.IDENTICAL), ("a\x00", "b", Reason.BAD_TEXT),
    ("a" * 100, "b", Reason.TOO_LONG)])
def test_checks_refuse_unusable_pairs(chosen, rejected, reason):
    with pytest.raises(RowError) as e:
        check_candidate([{"role": "user", "content": "q"}], chosen, rejected, max_chars=50)
    assert e.value.reason is reason


def test_ids_fast_path_equals_the_definition_on_adversarial_texts():
    """pair_ids/comparison_ids skip the normalization regex for texts it cannot change; on texts built from
    every character the normalization treats specially (blank runs at edges and inside, CRLF, form feeds,
    Unicode spaces, decomposed accents), they must equal the definition: XXH3-128 of key_expr(nfc=True)."""
    import random

    import polars as pl
    import xxhash

    from pipelines.schema import (HISTORY_DTYPE, comparison_ids, comparison_key_expr, key_expr, pair_ids)

    pieces = ["a", "Bc", " ", "  ", "\t", "\r\n", "\r", "\n", "\x0b", "\x0c", "\u00a0", "\u2000", "\u3000",
              "e\u0301", "\u00e9", "\x85", "\u200b", "x y", "ﬁ"]
    rng = random.Random(7)

    def text() -> str:
        return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))

    rows = [{"history": [{"role": rng.choice(["user", "assistant"]), "content": text()}
                         for _ in range(rng.randint(1, 3))], "chosen": text(), "rejected": text()}
            for _ in range(3000)]
    rows += [{"history": [{"role": "user", "content": "plain ascii prompt"}], "chosen": " ok ", "rejected": "no"}]
    df = pl.DataFrame(rows, schema={"history": HISTORY_DTYPE, "chosen": pl.String, "rejected": pl.String})
    for fast, definition in ((pair_ids, key_expr(nfc=True)), (comparison_ids, comparison_key_expr(True))):
        want = [xxhash.xxh3_128_hexdigest(k.encode()) for k in df.select(k=definition)["k"]]
        assert fast(df).to_list() == want
    # both paths were exercised: some rows need the full normalization, some do not
    plain = df.select(k=key_expr(nfc=True))["k"] == df.select(
        k=pl.concat_str([pl.col("history").list.eval(pl.element().struct.field("role") + "\x1f"
                                                     + pl.element().struct.field("content").str.strip_chars())
                         .list.join("\x1e"), pl.col("chosen").str.strip_chars(),
                         pl.col("rejected").str.strip_chars()], separator="\x1d"))["k"]
    assert 0 < plain.sum() < df.height
