"""Benchmark formats the paper reports (RewardBench 2 with Ties, RM-Bench's style matrix) read and scored right."""

import json
import math

import polars as pl
import pytest

from pipelines.evaluate.benchmarks import read_benchmark
from pipelines.evaluate.harness import aggregate, ties_score


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rewardbench2_rows_keep_every_correct_answer_and_the_ties_keys(tmp_path):
    rows = [{"id": "0", "prompt": "2+2?", "chosen": ["4"], "rejected": ["5", "3", "22"], "subset": "Math"},
            {"id": "ref:7", "prompt": "Name a prime.", "chosen": ["2"], "rejected": ["4"], "subset": "Ties"},
            {"id": "tied:7", "prompt": "Name a prime.", "chosen": ["2", "3", "5"], "rejected": ["4", "9"],
             "subset": "Ties"}]
    items = pl.DataFrame(read_benchmark(_write(tmp_path / "rewardbench2.jsonl", rows), "rewardbench2"))
    assert items["section"].to_list() == ["Math", "Ties", "Ties"]
    assert items["subset"].to_list() == ["", "", ""]  # the RB2 subset is the section, not a second split
    assert items["chosen"].to_list() == ["4", "2", "2"]
    assert items["chosen_more"].to_list() == [[], [], ["3", "5"]]
    assert items["rejected"].to_list()[0] == ["5", "3", "22"]
    assert items["item_key"].to_list() == ["0", "ref:7", "tied:7"]
    assert items["history"][0].to_list() == [{"role": "user", "content": "2+2?"}]


def test_rm_bench_style_matrix_becomes_easy_normal_hard_items(tmp_path):
    rows = [{"id": 3, "prompt": "p", "domain": "chat", "chosen": ["c0", "c1", "c2"], "rejected": ["r0", "r1", "r2"]}]
    items = pl.DataFrame(read_benchmark(_write(tmp_path / "rm-bench.jsonl", rows), "rm-bench"))
    assert items.height == 9 and set(items["section"]) == {"chat"}
    sub = {(c, r[0]): s for c, r, s in items.select("chosen", "rejected", "subset").iter_rows()}
    assert sub[("c0", "r0")] == "normal" and sub[("c0", "r2")] == "hard" and sub[("c2", "r0")] == "easy"
    assert items.group_by("subset").len().sort("subset")["len"].to_list() == [3, 3, 3]


def _scored(rows):
    return pl.DataFrame(rows, schema={"benchmark": pl.String, "section": pl.String, "subset": pl.String,
                                      "item_key": pl.String, "r_chosen_all": pl.List(pl.Float64),
                                      "r_rejected": pl.List(pl.Float64)}, orient="row").with_columns(
        correct=pl.col("r_chosen_all").list.min() > pl.col("r_rejected").list.max())


def test_ties_score_follows_rewardbench2():
    rows = [("rewardbench2", "Ties", "", "ref:0", [3.0], [1.0, 0.0]),       # right, gap 2
            ("rewardbench2", "Ties", "", "tied:0", [3.0, 2.5], [1.0]),     # right, spread 0.5, gap 1.5
            ("rewardbench2", "Ties", "", "ref:1", [0.0], [1.0]),           # wrong, gap -1
            ("rewardbench2", "Ties", "", "tied:1", [2.0, 0.0], [1.0]),     # wrong, spread 2, gap -1
            ("rewardbench2", "Math", "", "0", [2.0], [1.0, 0.5, 3.0]),     # best-of-4 miss
            ("rewardbench2", "Math", "", "1", [2.0], [1.0, 0.5, 0.0])]     # best-of-4 hit
    scored = _scored(rows)
    expected = 0.3 * 0.5 + 0.3 * 0.5 + 0.2 * 0.5 + 0.2 * 0.5 + 0.01 * (math.tanh(2.0) + math.tanh(-1.5)) / 2
    assert ties_score(scored.filter(pl.col("section") == "Ties")) == pytest.approx(expected)
    res = aggregate(scored, "rm:1")
    by = dict(res.select("section", "accuracy").iter_rows())
    assert by["Ties"] == pytest.approx(expected) and by["Math"] == pytest.approx(0.5)
    assert by["overall"] == pytest.approx((expected + 0.5) / 2)  # RB2 averages its sections


def test_ties_without_keys_is_a_clear_error():
    with pytest.raises(ValueError, match="ref:<id>"):
        ties_score(_scored([("rewardbench2", "Ties", "", "17", [1.0], [0.0])]))


def test_harness_scores_every_correct_answer_with_the_model(tmp_path):
    """score_items on a real (tiny, random) decoder: each response is scored as score_texts scores it alone, and
    an item is right only when its worst correct answer beats its best wrong one."""
    from pipelines.evaluate.harness import evaluate
    from pipelines.rm.model import load_reward_model
    from pipelines.rm.score import score_texts
    from pipelines.rm.tiny import build_tiny_decoder

    rm = load_reward_model(build_tiny_decoder(tmp_path / "qwen3", "qwen3"))
    rows = [{"id": "ref:1", "prompt": "Name a prime.", "chosen": ["2"], "rejected": ["4", "six"], "subset": "Ties"},
            {"id": "tied:1", "prompt": "Name a prime.", "chosen": ["2", "3", "eleven"], "rejected": ["4"],
             "subset": "Ties"},
            {"id": "9", "prompt": "2+2?", "chosen": ["4"], "rejected": ["5", "3", "22"], "subset": "Math"}]
    bench = pl.DataFrame(read_benchmark(_write(tmp_path / "rewardbench2.jsonl", rows), "rewardbench2"))
    res, scored = evaluate(rm, bench, "tiny:1")
    for row in scored.iter_rows(named=True):
        h = row["history"]
        good = score_texts(rm, [(h, c) for c in [row["chosen"], *row["chosen_more"]]])
        bad = score_texts(rm, [(h, r) for r in row["rejected"]])
        assert row["r_chosen_all"] == pytest.approx(good, abs=1e-4) and row["r_rejected"] == pytest.approx(bad, abs=1e-4)
        assert row["correct"] == (min(good) > max(bad))
    by = dict(res.select("section", "accuracy").iter_rows())
    assert by["Ties"] == pytest.approx(ties_score(scored.filter(pl.col("section") == "Ties")))


def test_rewardbench1_subsets_roll_up_into_its_four_sections_with_math_upweighted(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r", "subset": s}
            for i, s in enumerate(["alpacaeval-easy", "mt-bench-hard", "donotanswer", "math-prm", "hep-go", "hep-rust"])]
    items = pl.DataFrame(read_benchmark(_write(tmp_path / "rewardbench.jsonl", rows), "rewardbench"))
    assert items["section"].to_list() == ["Chat", "Chat Hard", "Safety", "Reasoning", "Reasoning", "Reasoning"]
    assert items["subset"].to_list()[3:] == ["math-prm", "hep-go", "hep-rust"]
    scored = pl.DataFrame({"benchmark": ["rewardbench"] * 6, "section": items["section"], "subset": items["subset"],
                           "item_key": items["item_key"], "correct": [True, False, True, True, False, False]})
    by = dict(aggregate(scored, "rm:1").select("section", "accuracy").iter_rows())
    assert by["Reasoning"] == pytest.approx(0.5)  # math 1.0 and code 0.0 count equally (pooled would be 1/3)
    assert by["overall"] == pytest.approx((1 + 0 + 1 + 0.5) / 4)
