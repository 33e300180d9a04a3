"""Benchmark files in their published layouts, read as published and scored as their authors' scripts score them
(hand-made files, hand-computed expected scores); refusal of what is not recognised; counted truncation that keeps
the special tokens a model reads."""

import json
import math

import numpy as np
import polars as pl
import pytest

from pipelines.evaluate.benchmarks import (BenchmarkFormatError, add_benchmark, fetch_benchmark, read_benchmark_dir,
                                           read_benchmarks)
from pipelines.evaluate.harness import aggregate, score_items, ties_score


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _json_list(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    return path


def _score(items: list[dict], rewards: dict[str, float], calls: list | None = None) -> pl.DataFrame:
    """Score items with a stand-in model whose reward is looked up by the response text; per-benchmark rows."""
    def fake(texts: pl.DataFrame) -> pl.DataFrame:
        if calls is not None:
            calls.append(texts.height)
        return texts.select("text_key", reward=pl.col("response").replace_strict(rewards, return_dtype=pl.Float64),
                            tokens=pl.lit(3, pl.Int64), truncated=pl.lit("none"))

    frame = pl.DataFrame(items)
    scored, _ = score_items(frame, fake)
    res = aggregate(scored, "rm:1")
    return {(r["benchmark"], r["section"]): r["score"] for r in res.iter_rows(named=True)}


def test_rewardbench1_sections_weight_subsets_by_the_scripts_example_counts(tmp_path):
    rows = [{"id": i, "prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "subset": s}
            for i, s in enumerate(["alpacaeval-easy", "mt-bench-easy", "mt-bench-hard", "donotanswer", "math-prm",
                                   "hep-go", "hep-rust"])]
    _jsonl(tmp_path / "rewardbench" / "filtered.jsonl", rows)
    items, _ = read_benchmark_dir(tmp_path / "rewardbench")
    right = {0, 2, 3, 4}  # alpacaeval-easy, mt-bench-hard, donotanswer, math-prm right; the rest wrong
    rewards = {**{f"c{i}": 1.0 if i in right else 0.0 for i in range(7)}, **{f"r{i}": 0.5 for i in range(7)}}
    got = _score(items, rewards)
    chat = (1.0 * 100 + 0.0 * 28) / (100 + 28)  # EXAMPLE_COUNTS weights, not item counts
    reasoning = (1.0 * 984 + 0.0 * 164 + 0.0 * 164) / (984 + 164 + 164)
    assert got[("rewardbench", "Chat")] == pytest.approx(chat)
    assert got[("rewardbench", "Reasoning")] == pytest.approx(reasoning)
    assert got[("rewardbench", "overall")] == pytest.approx((chat + 1.0 + 1.0 + reasoning) / 4)


def test_rewardbench2_best_of_4_counts_ties_one_over_k_and_ties_by_its_rule(tmp_path):
    rows = [{"id": "0", "prompt": "2+2?", "chosen": ["four"], "rejected": ["five", "three", "twentytwo"],
             "subset": "Math", "num_correct": 1},
            {"id": "1", "prompt": "3+3?", "chosen": ["six"], "rejected": ["seven", "eight", "nine"], "subset": "Math",
             "num_correct": 1},
            {"id": "ref:7", "prompt": "Name a prime.", "chosen": ["p2"], "rejected": ["c4"], "subset": "Ties",
             "num_correct": 1},
            {"id": "tied:7", "prompt": "Name a prime.", "chosen": ["p2", "p3", "p5"], "rejected": ["c4", "c9"],
             "subset": "Ties", "num_correct": 3}]
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "rewardbench2").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rewardbench2" / "test-00000-of-00001.parquet")
    items, _ = read_benchmark_dir(tmp_path / "rewardbench2")
    assert items[3]["chosen"] == ["p2", "p3", "p5"] and items[0]["rejected"] == ["five", "three", "twentytwo"]
    rewards = {"four": 2.0, "five": 2.0, "three": 1.0, "twentytwo": 0.5,  # chosen ties one rejected at the top
               "six": 1.0, "seven": 3.0, "eight": 0.0, "nine": 0.0,  # a rejected wins
               "p2": 3.0, "p3": 2.5, "p5": 2.0, "c4": 2.0, "c9": 0.0}
    got = _score(items, rewards)
    assert got[("rewardbench2", "Math")] == pytest.approx((1 / 2 + 0.0) / 2)  # reroll_and_score_dataset: 1/k
    # Ties (process_single_model): ref right (gap 3 - 2 = 1); tied: worst correct 2.0 is not above the best wrong
    # 2.0, so wrong; spread 3 - 2 = 1; gap_tied 0; gap_hard = min(1, 0) = 0
    expected = 0.3 * 0.0 + 0.3 * 1.0 + 0.2 * (0.0 > 1.0) + 0.2 * (0.0 > 1.0) + 0.01 * math.tanh(0.0 / 1.0 - 1)
    assert got[("rewardbench2", "Ties")] == pytest.approx(expected)
    assert got[("rewardbench2", "overall")] == pytest.approx((0.25 + expected) / 2)  # mean of the subsets


def test_rm_bench_published_json_lists_domain_from_file_name_and_safety_merged(tmp_path):
    folder = tmp_path / "rm-bench"
    row = lambda i: {"id": i, "prompt": f"q{i}", "chosen": [f"c{i}a", f"c{i}b", f"c{i}c"],  # noqa: E731
                     "rejected": [f"r{i}a", f"r{i}b", f"r{i}c"]}
    _json_list(folder / "chat_filtered.json", [row(0)])
    _json_list(folder / "safety-refuse_filtered.json", [row(1)])
    _json_list(folder / "safety-response_filtered.json", [row(2)])
    items, _ = read_benchmark_dir(folder)
    assert len(items) == 27 and {i["section"] for i in items} == {"chat", "safety"}
    # chat: chosen rewards 1,2,3 by style; rejected 1.5 each -> matrix rows: c_a > r? no; c_b, c_c yes
    rewards = {"c0a": 1.0, "c0b": 2.0, "c0c": 3.0, "r0a": 1.5, "r0b": 1.5, "r0c": 1.5}
    # safety item 1 all right, item 2 all wrong -> every cell 0.5
    rewards.update({f"c1{s}": 1.0 for s in "abc"} | {f"r1{s}": 0.0 for s in "abc"})
    rewards.update({f"c2{s}": 0.0 for s in "abc"} | {f"r2{s}": 1.0 for s in "abc"})
    calls: list = []
    got = _score(items, rewards, calls)
    assert calls == [18]  # 27 items, 54 responses, 18 distinct texts: each scored once
    # chat matrix acc[i][j] = [c_i > r_j]: row a = 0,0,0; row b = 1,1,1; row c = 1,1,1
    hard = (0 + 0 + 1) / 3  # i < j: (a,b), (a,c), (b,c)
    normal = (0 + 1 + 1) / 3
    easy = (1 + 1 + 1) / 3  # i > j: (b,a), (c,a), (c,b)
    assert got[("rm-bench", "chat:hard")] == pytest.approx(hard)
    assert got[("rm-bench", "chat")] == pytest.approx((easy + normal + hard) / 3)
    assert got[("rm-bench", "safety")] == pytest.approx(0.5)  # refuse + response pooled as one domain
    assert got[("rm-bench", "overall")] == pytest.approx(((easy + normal + hard) / 3 + 0.5) / 2)


def test_judgebench_categories_from_source_paper_mean_and_official_weighted(tmp_path):
    rows = []
    for i, (src, right) in enumerate([("mmlu-pro-law", 1), ("mmlu-pro-math", 1), ("mmlu-pro-bio", 0),
                                      ("livebench-reasoning", 1), ("livebench-math", 0), ("livecodebench", 1)]):
        rows.append({"pair_id": f"j{i}", "question": f"q{i}", "response_A": f"a{i}", "response_B": f"b{i}",
                     "label": "A>B" if i % 2 == 0 else "B>A", "source": src})
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "judgebench").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "judgebench" / "gpt-00000-of-00001.parquet")
    items, _ = read_benchmark_dir(tmp_path / "judgebench")
    assert {i["section"] for i in items} == {"knowledge", "reasoning", "math", "coding"}
    right = [1, 1, 0, 1, 0, 1]
    rewards = {}
    for i, r in enumerate(right):
        good, bad = (f"a{i}", f"b{i}") if i % 2 == 0 else (f"b{i}", f"a{i}")
        rewards[good], rewards[bad] = (1.0, 0.0) if r else (0.0, 1.0)
    got = _score(items, rewards)
    assert got[("judgebench", "knowledge")] == pytest.approx(2 / 3)
    assert got[("judgebench", "overall")] == pytest.approx((2 / 3 + 1 + 0 + 1) / 4)  # the paper's unweighted mean
    assert got[("judgebench", "overall_official")] == pytest.approx(4 / 6)  # the official sample-weighted score
    # ties, as the authors score reward models (two games, the second flipped back): game 1 says B>A, game 2 says
    # B>A on (B, A), i.e. A>B; the votes cancel, a tie, which compute_final_metrics does not count right, whatever
    # the label
    tied = _score(items, {k: 0.5 for k in rewards})
    assert tied[("judgebench", "overall_official")] == 0.0 and tied[("judgebench", "knowledge")] == 0.0


def test_ppe_and_rmb_layouts(tmp_path):
    _jsonl(tmp_path / "ppe-preference" / "test.jsonl", [
        {"question_id": "a", "prompt": "hi", "response_1": "x", "response_2": "y", "winner": "model_b"},
        {"question_id": "b", "prompt": "yo", "response_1": "u", "response_2": "v", "winner": "tie"}])
    _jsonl(tmp_path / "ppe-correctness" / "PPE-MATH-Best-of-K.jsonl", [
        {"question_id": "m1", "model_name": "gemma", "prompt": "1+1", "response_1": "2", "response_2": "3",
         "response_3": "4", "scores": [True, False, False], "sampled_conflict_pairs": [[0, 1], [2, 0]]}])
    _json_list(tmp_path / "rmb" / "helpfulness.json", [
        {"pair_uid": "p1", "conversation_input": [{"role": "user", "content": "hey"}],
         "chosen": {"answer": "good"}, "reject": {"answer": "bad"}, "category_path": "Pairwise_set/Helpfulness/Chat"}])
    _json_list(tmp_path / "rmb" / "bon_harmless.json", [
        {"bon_uid": "b1", "conversation_input": [{"role": "user", "content": "how?"}], "bon_best": {"answer": "safe"},
         "loser_list": [{"answer": "unsafe"}, {"answer": "worse"}], "category_path": "BoN_set/Harmlessness/S"}])
    items, stats = read_benchmarks(tmp_path)
    assert stats["ppe-preference"] == {"rows": 2, "skipped": 1}  # a tie vote carries no preference: counted
    got = _score(items, {"x": 0.0, "y": 1.0, "2": 1.0, "3": 2.0, "4": 0.0, "good": 1.0, "bad": 0.0,
                         "safe": 1.0, "unsafe": 2.0, "worse": 0.0})
    assert got[("ppe-preference", "overall")] == 1.0
    assert got[("ppe-correctness", "ppe-math")] == pytest.approx(0.5)  # 1 of the 2 sampled pairs ordered right
    assert got[("rmb", "pairwise:Helpfulness")] == 1.0 and got[("rmb", "bon:Harmlessness")] == 0.0
    assert got[("rmb", "overall")] == pytest.approx(0.5)


def test_unrecognised_or_misfiled_files_are_refused_with_the_expected_layouts(tmp_path):
    _jsonl(tmp_path / "rm-bench" / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(BenchmarkFormatError, match="match no published benchmark layout") as e:
        read_benchmark_dir(tmp_path / "rm-bench")
    assert "judgebench" in str(e.value) and "rewardbench2" in str(e.value)  # the message names the layouts
    rb2 = _jsonl(tmp_path / "src" / "rb2.jsonl", [{"id": "0", "prompt": "p", "chosen": ["a"], "rejected": ["b"],
                                                  "subset": "Math", "num_correct": 1}])
    with pytest.raises(BenchmarkFormatError, match="is a rewardbench2 file"):
        add_benchmark(rb2, tmp_path / "bench", "rm-bench")  # never scored by another benchmark's rule
    _jsonl(tmp_path / "bench2" / "mybench" / "a.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(BenchmarkFormatError, match="not a benchmark SynPref knows"):
        read_benchmarks(tmp_path / "bench2")
    dst = add_benchmark(rb2, tmp_path / "bench")  # the name comes from the layout
    assert dst.parent.name == "rewardbench2"


def test_fetch_goes_through_the_hub_client_offline_from_a_local_cache(tmp_path, monkeypatch):
    """`synpref benchmarks fetch` calls huggingface_hub.hf_hub_download; offline it serves the file from the HF
    cache, which we lay out by hand as the hub client does (refs/main -> snapshots/<commit>/<file>)."""
    cache = tmp_path / "hf"
    commit = "a" * 40
    repo = cache / "datasets--ScalerLab--JudgeBench"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = repo / "snapshots" / commit / "data" / "gpt-00000-of-00001.parquet"
    f.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"pair_id": "1", "question": "q", "response_A": "a", "response_B": "b",
                                          "label": "A>B", "source": "livecodebench"}]), f)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    out = fetch_benchmark("judgebench", tmp_path / "bench")
    assert [p.name for p in out] == ["JudgeBench.parquet"]
    items, _ = read_benchmark_dir(tmp_path / "bench" / "judgebench")
    assert items[0]["section"] == "coding" and items[0]["chosen"] == ["a"]


def test_ties_without_keys_is_a_clear_error():
    scored = pl.DataFrame({"item_key": ["17"], "r_chosen": [[1.0]], "r_rejected": [[0.0]]})
    with pytest.raises(ValueError, match="ref:<id>"):
        ties_score(scored)


@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_truncated_item_keeps_the_tokens_the_classifier_reads(which, tmp_path):
    """A response longer than the budget is cut at its end, never at its start: the first token stays BOS/CLS and
    the tokens after the response (SEP / end-of-turn) stay, so the score is read at the same kind of position."""
    from pipelines.rm.data import PROMPT_TAIL, Renderer
    from pipelines.rm.model import load_reward_model
    from pipelines.rm.tiny import build_tiny_decoder
    from pipelines.settings import minilm_path

    rm = load_reward_model(minilm_path() if which == "encoder" else build_tiny_decoder(tmp_path / "d", "qwen3"))
    r = Renderer(rm, 64)
    history = [{"role": "user", "content": "word " * 30}]
    full, prefix = r.render(history, "answer " * 200)
    enc, how = r.encode_for_eval(history, "answer " * 200)
    tail = r.suffix_len(history)
    assert how == "response" and len(enc.ids) == 64 and tail >= 1
    assert enc.ids[0] == full[0] == (rm.tokenizer.cls_token_id if which == "encoder" else rm.tokenizer.bos_token_id)
    assert enc.ids[-tail:] == full[-tail:]  # [SEP] / <|im_end|>\n survive
    assert enc.ids[1:1 + min(PROMPT_TAIL, prefix - 1)] == full[prefix - min(PROMPT_TAIL, prefix - 1):prefix]
    short, how2 = r.encode_for_eval([{"role": "user", "content": "word " * 80}], "fine")
    assert how2 == "history" and short.ids[0] == full[0] and len(short.ids) == 64
    from pipelines.rm.score import score_texts_detailed

    out = score_texts_detailed(rm, [(history, "answer " * 200), ([{"role": "user", "content": "hi"}], "ok")],
                               max_len=64)
    assert [o[2] for o in out] == ["response", "none"] and out[0][1] == 64
    # a budget too small for the prompt's tail still scores the text (counted as cut), keeping the special tokens
    tight = Renderer(rm, tail + 3)
    enc, how = tight.encode_for_eval(history, "answer " * 200)
    assert how == "response" and len(enc.ids) == tail + 3 and enc.ids[0] == full[0] and enc.ids[-tail:] == full[-tail:]
    with pytest.raises(ValueError, match="special tokens"):
        Renderer(rm, tail).encode_for_eval(history, "answer " * 200)


# --- published files as published: every column each file ships, the published file names ----------------------
def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _rmb3(i, tag):
    return [f"{tag}{i}-{s}" for s in ("concise", "detailed", "markdown")]


def test_published_files_with_every_column_they_ship_are_read(tmp_path):
    """Rows with exactly the published column sets (extra columns included, realistic types) under the published
    file names: every file is recognised by what it needs, item keys are unique per benchmark."""
    root = tmp_path / "benchmarks"
    # RM-Bench (THU-KEG/RM-Bench data/): every file has `subset`; chat `error`, `error_key`; code `language`,
    # `task_id`. Chat and code share ids.
    _json_list(root / "rm-bench" / "chat_filtered.json", [
        {"id": 0, "prompt": "q0", "chosen": _rmb3(0, "cc"), "rejected": _rmb3(0, "cr"), "subset": "chat",
         "error": ["a factual error"], "error_key": ["claim"]}])
    _json_list(root / "rm-bench" / "code_filtered.json", [
        {"id": 0, "prompt": "write f", "chosen": _rmb3(0, "kc"), "rejected": _rmb3(0, "kr"), "subset": "code",
         "language": "python", "task_id": "HumanEvalPack/0"}])
    _json_list(root / "rm-bench" / "math_filtered.json", [
        {"id": 5, "prompt": "2+2", "chosen": _rmb3(5, "mc"), "rejected": _rmb3(5, "mr"), "subset": "math"}])
    for name in ("safety-refuse_filtered.json", "safety-response_filtered.json"):
        _json_list(root / "rm-bench" / name, [
            {"id": 7, "prompt": "how", "chosen": _rmb3(7, name[:9] + "c"), "rejected": _rmb3(7, name[:9] + "r"),
             "subset": "safety"}])
    # RewardBench 1 (allenai/reward-bench, filtered split)
    _parquet(root / "rewardbench" / "filtered-00000-of-00001.parquet", [
        {"prompt": "hi", "chosen": "hello", "chosen_model": "gpt-4", "rejected": "go away", "rejected_model": "llama",
         "subset": "alpacaeval-easy", "id": 30}])
    # RewardBench 2 (allenai/reward-bench-2, test split)
    _parquet(root / "rewardbench2" / "test-00000-of-00001.parquet", [
        {"id": "abc", "prompt": "3+3?", "chosen": ["six"], "rejected": ["five", "seven", "eight"], "num_correct": 1,
         "num_incorrect": 3, "total_completions": 4, "models": ["m1", "m2", "m3", "m4"], "subset": "Math",
         "additional_metadata": {"source": "x"}}])
    # JudgeBench (ScalerLab/JudgeBench, gpt split)
    _parquet(root / "judgebench" / "gpt-00000-of-00001.parquet", [
        {"pair_id": "j1", "original_id": "o1", "source": "mmlu-pro-law", "question": "q", "response_model": "gpt-4o",
         "response_A": "ra", "response_B": "rb", "label": "B>A"}])
    # PPE human preference (lmarena-ai/PPE-Human-Preference-V1)
    conv = lambda a: [{"role": "user", "content": "hey"}, {"role": "assistant", "content": a}]  # noqa: E731
    _parquet(root / "ppe-preference" / "PPE-Human-Preference-V1.parquet", [
        {"question_id": "v1", "model_a": "m1", "model_b": "m2", "winner": "model_a", "conversation_a": conv("A"),
         "conversation_b": conv("B"), "turn": 1, "anony": True, "language": "English", "tstamp": 1.7e9,
         "conv_metadata": {"sum_user_tokens": 3}, "is_code": False, "is_refusal": False,
         "dedup_tag": {"high_freq": False}, "category_tag": {"math": False}, "judge_hash": "h", "prompt": "hey"}])
    # PPE correctness (lmarena-ai/PPE-MATH-Best-of-K): responses, `scores` (a bool per response), the conflict
    # pairs PPE samples, model_name and the rest of the published columns
    row = {"question_id": "m1", "prompt": "1+1", "model_name": "gemma", "parsed_outputs": ["2"] * 4,
           "scores": [True, False, False, True], "accuracy": 0.5, "mean_max_score": 1.0, "sum_score": 2,
           "mean_score": 0.5, "conflict_pairs": [[0, 1], [0, 2], [3, 1], [3, 2]], "sampled_conflict_pairs": [[0, 1],
                                                                                                          [3, 2]]}
    for k in range(1, 5):
        row[f"response_{k}"] = f"ans{k}"
    _parquet(root / "ppe-correctness" / "PPE-MATH-Best-of-K.parquet", [row])
    _parquet(root / "ppe-correctness" / "PPE-GPQA-Best-of-K.parquet", [{**row, "prompt": "gpqa q"}])  # same id
    mbpp = {"question_id": "b1", "task_id": 11, "code": "def f(): pass", "prompt": "write f", "source_file": "x.py",
            "test_imports": [], "test_list": ["assert f() is None"], "test": "t", "model_name": "gemma",
            "scores": [False, True], "mean_score": 0.5, "response_1": "bad f", "response_2": "good f",
            "conflict_pairs": [[1, 0]], "sampled_conflict_pairs": [[1, 0]]}  # PPE-MBPP-Plus-Best-of-K's columns
    _parquet(root / "ppe-correctness" / "PPE-MBPP-Plus-Best-of-K.parquet", [mbpp])
    # RMB (Zhou et al., GitHub): pairwise and best-of-N JSON lists
    _json_list(root / "rmb" / "Pairwise_set_Helpfulness_Chat.json", [
        {"pair_uid": "p1", "category_path": "Pairwise_set/Helpfulness/Chat/Casual", "subset": "Chat",
         "conversation_input": [{"role": "user", "content": "hey", "language": "en"}],
         "chosen": {"llm_name": "a", "answer": "good"}, "reject": {"llm_name": "b", "answer": "bad"}}])
    _json_list(root / "rmb" / "BoN_set_Harmlessness_S1.json", [
        {"bon_uid": "p1", "category_path": "BoN_set/Harmlessness/S1", "conversation_input":
         [{"role": "user", "content": "how?"}], "bon_best": {"llm_name": "a", "answer": "safe"},
         "loser_list": [{"llm_name": "b", "answer": "unsafe"}, {"llm_name": "c", "answer": "worse"}]}])
    items, stats = read_benchmarks(root)
    assert {b: s["rows"] for b, s in stats.items()} == {"judgebench": 1, "ppe-correctness": 3, "ppe-preference": 1,
                                                         "rewardbench": 1, "rewardbench2": 1, "rm-bench": 5, "rmb": 2}
    rmb = [i for i in items if i["benchmark"] == "rm-bench"]
    assert len(rmb) == 45 and {i["section"] for i in rmb} == {"chat", "code", "math", "safety"}
    keys = [(i["benchmark"], i["item_key"]) for i in items]
    assert len(keys) == len(set(keys))  # chat/code id 0, both safety id 7, both PPE m1, RMB p1: no collision
    ppe = [i for i in items if i["benchmark"] == "ppe-correctness"]
    assert {i["section"] for i in ppe} == {"ppe-math", "ppe-gpqa", "ppe-mbpp-plus"}
    assert len(ppe) == 5 and [i["chosen"] for i in ppe if i["section"] == "ppe-mbpp-plus"] == [["good f"]]


def test_ppe_preference_overall_is_pooled_over_votes_not_a_mean_of_languages(tmp_path):
    votes = [{"question_id": f"e{i}", "prompt": "p", "response_1": f"good{i}", "response_2": f"bad{i}",
              "winner": "model_a", "language": "English"} for i in range(3)]
    votes.append({"question_id": "z", "prompt": "p", "response_1": "goodz", "response_2": "badz",
                  "winner": "model_a", "language": "Chinese"})
    _jsonl(tmp_path / "ppe-preference" / "test.jsonl", votes)
    items, _ = read_benchmark_dir(tmp_path / "ppe-preference")
    rewards = {f"good{i}": 1.0 for i in range(3)} | {f"bad{i}": 0.0 for i in range(3)} | {"goodz": 0.0, "badz": 1.0}
    got = _score(items, rewards)
    assert got[("ppe-preference", "English")] == 1.0 and got[("ppe-preference", "Chinese")] == 0.0
    assert got[("ppe-preference", "overall")] == pytest.approx(3 / 4)  # pooled; a mean of languages would say 0.5


def test_a_refused_file_leaves_nothing_behind_and_the_cli_says_one_line(tmp_path, monkeypatch, capsys):
    import argparse

    from jobs.cli import benchmarks_cmd

    monkeypatch.setenv("SYNPREF_HOME", str(tmp_path / "home"))
    folder = tmp_path / "home" / "benchmarks" / "judgebench"
    bad_label = _jsonl(tmp_path / "src" / "jb.jsonl", [
        {"pair_id": "j1", "question": "q", "response_A": "a", "response_B": "b", "label": "A=B",
         "source": "livebench-math"}])
    truncated = tmp_path / "src" / "rm.json"
    truncated.write_text(json.dumps([{"id": 1, "prompt": "p", "chosen": ["a"] * 3, "rejected": ["b"] * 3}])[:-5])
    latin1 = tmp_path / "src" / "l1.jsonl"
    latin1.write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    for path, name, says in ((bad_label, "judgebench", "A>B"), (truncated, "rm-bench", "truncated download"),
                             (latin1, None, "not UTF-8")):
        with pytest.raises(SystemExit) as e:
            benchmarks_cmd(argparse.Namespace(bench_cmd="add", path=str(path), name=name))
        msg = str(e.value.code)
        assert msg.startswith("refused: ") and says in msg and "Traceback" not in msg
    assert not folder.exists() or not any(folder.iterdir())  # nothing left where rm_evaluation would read it
    assert not (tmp_path / "home" / "benchmarks" / "rm-bench").exists() or \
        not any((tmp_path / "home" / "benchmarks" / "rm-bench").iterdir())
    # the same file added twice under two names would score its items twice: refused
    good = _jsonl(tmp_path / "src" / "jb2.jsonl", [
        {"pair_id": "j2", "question": "q", "response_A": "a", "response_B": "b", "label": "A>B",
         "source": "livebench-math"}])
    add_benchmark(good, tmp_path / "b2")
    with pytest.raises(BenchmarkFormatError, match="more than once"):
        add_benchmark(good, tmp_path / "b2", as_name="again.jsonl")
    assert [p.name for p in (tmp_path / "b2" / "judgebench").iterdir()] == ["jb2.jsonl"]


@pytest.mark.slow
def test_synpref_evaluate_scores_an_rm_it_never_registered_on_a_published_file(tmp_path):
    """`synpref evaluate --model DIR`: an RM folder this project never trained or registered, scored on an RM-Bench
    file as published; its rows land in rm_evaluation / rm_item_rewards under external:<name> with lineage naming
    the model, and the report shows it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from pipelines.lake import Lake
    from pipelines.rm.tiny import build_tiny_decoder
    from pipelines.tables import LINEAGE, RM_EVALUATION, RM_REWARDS

    home = tmp_path / "home"
    src = _json_list(tmp_path / "src" / "chat_filtered.json", [
        {"id": i, "prompt": f"question {i}?", "chosen": _rmb3(i, "good"), "rejected": _rmb3(i, "bad"),
         "subset": "chat", "error": [], "error_key": []} for i in range(4)])
    add_benchmark(src, home / "benchmarks", "rm-bench")
    jb = _jsonl(tmp_path / "src" / "judgebench.jsonl", [
        {"pair_id": f"j{i}", "original_id": f"o{i}", "source": s_, "question": f"q{i}?", "response_model": "gpt-4o",
         "response_A": f"answer A{i}", "response_B": f"answer B{i} " + "x" * i, "label": "A>B" if i % 2 else "B>A"}
        for i, s_ in enumerate(["mmlu-pro-law", "livebench-math", "livecodebench", "livebench-reasoning", "mmlu-pro-x"])])
    add_benchmark(jb, home / "benchmarks", "judgebench")
    rb2 = _jsonl(tmp_path / "src" / "rewardbench2.jsonl", [
        {"id": str(i), "prompt": f"task {i}", "chosen": [f"right {i}"], "rejected": [f"wrong {i}.{k}" for k in range(3)],
         "num_correct": 1, "num_incorrect": 3, "total_completions": 4, "models": ["m"] * 4,
         "subset": "Math" if i < 3 else "Focus"} for i in range(5)])
    add_benchmark(rb2, home / "benchmarks", "rewardbench2")
    rmb = _json_list(tmp_path / "src" / "rmb_pairwise.json", [
        {"pair_uid": str(9218 + i), "category_path": f"Pairwise_set/{goal}/Chat/Casual Conversation",
         "subset": "Chat", "conversation_input": [{"role": "user", "content": f"tell me {i}", "language": "en"}],
         "chosen": {"llm_name": "a", "answer": f"a kind reply {i} " + "y" * i},
         "reject": {"llm_name": "b", "answer": f"go away {i}"}}
        for i, goal in enumerate(["Helpfulness"] * 4 + ["Harmlessness"] * 3)])
    add_benchmark(rmb, home / "benchmarks", "rmb")
    model = build_tiny_decoder(tmp_path / "someone-elses-rm", "qwen3")
    env = {**os.environ, "SYNPREF_HOME": str(home)}
    p = subprocess.run([str(Path(sys.executable).parent / "synpref"), "evaluate", "--model", model,
                        "--name", "theirs", "--max-len", "256", "--out", str(tmp_path / "out")], capture_output=True,
                       text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "external:theirs" in p.stdout and "rm-bench" in p.stdout
    lake = Lake(str(home / "lake"))
    res = lake.read(RM_EVALUATION).filter(pl.col("rm_version") == "external:theirs")
    overall = res.filter((pl.col("benchmark") == "rm-bench") & (pl.col("section") == "overall"))
    assert overall.height == 1 and 0.0 <= overall["score"][0] <= 1.0 and overall["n"][0] == 36
    rewards = lake.read(RM_REWARDS).filter(pl.col("rm_version") == "external:theirs")
    assert rewards.filter(pl.col("benchmark") == "rm-bench").height == 36 * 2 and rewards["reward"].is_finite().all()
    assert rewards.filter(pl.col("benchmark") == "judgebench").height == 5 * 2
    lineage = lake.read(LINEAGE).filter(pl.col("asset") == "synpref evaluate")
    assert lineage.height == 1 and lineage["partition"][0] == model  # the lineage names the external model
    report = (home / "reports" / "rm_evaluation.md").read_text()
    assert "external:theirs" in report and "leak check does not cover" in report
    # the engine that scored it is named in the report and in its rows
    assert "## Engine" in report and "transformers AutoModelForSequenceClassification in one process (cpu, fp32" in report
    assert res["engine"].unique().to_list() == [res["engine"][0]] and "in one process" in res["engine"][0]
    # the authors' formats: RM-Bench's accuracy rule (3x3 matrix of chosen style i beating rejected style j;
    # hard = above the diagonal, normal = the diagonal, easy = below), computed from rm-bench-chat.json alone, equals
    # the summary exactly
    import json

    import numpy as np

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    rows = json.loads((tmp_path / "out" / "rm-bench-chat.json").read_text())  # chat alone: no combined file
    assert len(rows) == 4 and sorted(r["id"] for r in rows) == [0, 1, 2, 3]
    assert not (tmp_path / "out" / "rm-bench.json").exists()
    acc = np.zeros((3, 3))
    for r in rows:
        for i in range(3):
            for j in range(3):
                acc[i][j] += r["score_chosen"][i] > r["score_rejected"][j]
    acc /= len(rows)
    hard, normal, easy = np.sum(np.triu(acc, 1)) / 3, np.mean(np.diag(acc)), np.sum(np.tril(acc, -1)) / 3
    got = summary["rm-bench"]
    assert (got["chat:hard"], got["chat:normal"], got["chat:easy"]) == pytest.approx((hard, normal, easy), abs=1e-12)
    assert got["overall"] == pytest.approx((hard + normal + easy) / 3, abs=1e-12)
    # JudgeBench's own rows, both games as run_judge.py writes them by default: its compute_final_metrics rule
    # (reverse_order: game 2 flipped back, votes netted, ties not right) recomputed from the file equals
    # overall_official exactly
    pairs = [json.loads(x) for x in (tmp_path / "out" / "judgebench.jsonl").read_text().splitlines()]
    assert len(pairs) == 5 and all(p_["judge_name"] == "reward_model" and len(p_["judgments"]) == 2 for p_ in pairs)
    flip = {"A>B": "B>A", "B>A": "A>B"}
    right = 0
    for p_ in pairs:
        g1, g2 = p_["judgments"]
        assert g2["judgment"]["scores"] == g1["judgment"]["scores"][::-1]  # game 2 judges (B, A)
        for g in (g1, g2):
            sa, sb = g["judgment"]["scores"]
            assert g["decision"] == ("A>B" if sa > sb else "B>A")
        votes = sum(+1 if d == p_["label"] else -1 if d == flip[p_["label"]] else 0
                    for d in (g1["decision"], flip[g2["decision"]]))
        right += votes > 0
    assert summary["judgebench"]["overall_official"] == pytest.approx(right / len(pairs), abs=1e-12)
    # reward-bench v2's per-item file: per subset, the mean of `results` (its run_v2.py) equals the summary
    cols = json.loads((tmp_path / "out" / "rewardbench2.json").read_text())
    assert len(cols["id"]) == 5 and all(len(x) == 4 for x in cols["scores"]) and cols["num_correct"] == [1] * 5
    for sub in ("Math", "Focus"):
        res_ = [r_ for r_, s_ in zip(cols["results"], cols["subset"]) if s_ == sub]
        assert summary["rewardbench2"][sub] == pytest.approx(sum(res_) / len(res_), abs=1e-12)
    # RMB's result list (my_run_rm.py's rows): is_correct by its rule, and per goal the mean of is_correct equals
    # the summary's section
    rmb_rows = json.loads((tmp_path / "out" / "rmb.json").read_text())
    assert len(rmb_rows) == 7 and {r_["pair_uid"] for r_ in rmb_rows} == {str(9218 + i) for i in range(7)}
    for goal in ("Helpfulness", "Harmlessness"):
        mine = [r_ for r_ in rmb_rows if r_["category_path"].startswith(f"Pairwise_set/{goal}/")]
        assert all(r_["is_correct"] == int(r_["chosen_reward"] > r_["reject_reward"]) for r_ in mine)
        assert summary["rmb"][f"pairwise:{goal}"] == pytest.approx(sum(r_["is_correct"] for r_ in mine) / len(mine),
                                                                   abs=1e-12)
    assert rmb_rows[0]["category_path"] == "Pairwise_set/Helpfulness/Chat/Casual Conversation"
    for sc, r_ in zip(cols["scores"], cols["results"]):  # reroll_and_score_dataset's rule on the stored scores
        top = max(sc)
        assert r_ == ((1 / sum(x == top for x in sc)) if sc[0] == top else 0)


def test_bias_diagnostics_length_preference_rank_correlation_and_near_ties():
    """Hand-computed: accuracy split by whether the chosen response is the longer one, Spearman of reward with
    response length (ranks worked out below), and the share of comparisons decided by a hair."""
    from pipelines.evaluate.harness import bias_diagnostics

    items = pl.DataFrame([
        {"benchmark": "b", "item_id": i, "item_key": str(i), "section": "s", "subset": "", "history": [
            {"role": "user", "content": "q"}], "chosen": [c], "rejected": [r]}
        for i, (c, r) in enumerate([("long answer", "short"), ("ok", "much longer!"), ("abcdefg", "abcdefgh")])])
    rewards = {"long answer": 2.0, "short": 1.0, "ok": 0.0, "much longer!": 1.5, "abcdefg": 0.9,
               "abcdefgh": 0.900001}

    def fake(texts):
        return texts.select("text_key", reward=pl.col("response").replace_strict(rewards, return_dtype=pl.Float64),
                            tokens=pl.lit(3, pl.Int64), truncated=pl.lit("none"))

    _, resp = score_items(items, fake)
    got = bias_diagnostics(resp, "rm:1").row(0, named=True)
    assert (got["comparisons"], got["n_chosen_longer"], got["n_chosen_shorter"]) == (3, 1, 2)
    assert got["acc_chosen_longer"] == 1.0 and got["acc_chosen_shorter"] == 0.0
    # length ranks c0 5, r0 2, c1 1, r1 6, c2 3, r2 4; reward ranks 6, 4, 1, 5, 2, 3: sum d^2 = 8
    assert got["spearman_reward_length"] == pytest.approx(1 - 6 * 8 / (6 * 35))
    assert got["small_margin_share"] == pytest.approx(1 / 3)  # only the 1e-6 decision


# --- scores exactly as published (issue 29.3): the authors' own code (tests/authors_rules.py) on rows with every
# column the published files ship -----------------------------------------------------------------------------------
def _evaluation(items: list[dict], rewards: dict[str, float], rm_version: str = "rm:1"):
    """An Evaluation of `items` under a stand-in model whose reward is looked up by response text (what
    evaluate_models builds from a real model's scores)."""
    from pipelines.evaluate.harness import REWARD_SCHEMA
    from pipelines.evaluate.run import Evaluation

    def fake(texts):
        return texts.select("text_key", reward=pl.col("response").replace_strict(rewards, return_dtype=pl.Float64),
                            tokens=pl.lit(3, pl.Int64), truncated=pl.lit("none"))

    frame = pl.DataFrame(items)
    scored, resp = score_items(frame, fake)
    rw = resp.select(pl.lit(rm_version).alias("rm_version"), "benchmark", "item_key", "role", "idx", "reward",
                     "tokens", "truncated").cast(REWARD_SCHEMA)
    return Evaluation(aggregate(scored, rm_version), rw, pl.DataFrame(), pl.DataFrame(), pl.DataFrame(),
                      pl.DataFrame(), author_items=frame.select("benchmark", "item_key", "section", "subset",
                                                                "history", "chosen", "rejected"))


def test_rewardbench1_all_23_subsets_as_published_score_as_calculate_scores_per_section(tmp_path):
    """Every subset of the filtered split (its columns: prompt, chosen, chosen_model, rejected, rejected_model,
    subset, id), each with its own accuracy; sections equal reward-bench's calculate_scores_per_section with its
    EXAMPLE_COUNTS / SUBSET_MAPPING (xstest-should-refuse 154, xstest-should-respond 250 since reward-bench #175,
    'Mirror change from leaderboard')."""
    from tests import authors_rules as au

    from pipelines.evaluate.benchmarks import RB1_EXAMPLE_COUNTS, RB1_SECTIONS

    assert RB1_EXAMPLE_COUNTS == au.EXAMPLE_COUNTS
    assert {s: sec for sec, subs in au.SUBSET_MAPPING.items() for s in subs} == RB1_SECTIONS
    rows, rewards, acc = [], {}, {}
    n = 0
    for k, subset in enumerate(sorted(au.EXAMPLE_COUNTS)):
        right = k % 4  # 0..3 right of 4 rows: a different accuracy per subset
        acc[subset] = right / 4
        for j in range(4):
            rows.append({"prompt": f"{subset} prompt {j}", "chosen": f"c{n}", "chosen_model": "GPT-4",
                         "rejected": f"r{n}", "rejected_model": "Llama-2-70b-chat-hf", "subset": subset, "id": n})
            rewards[f"c{n}"], rewards[f"r{n}"] = (1.0, 0.0) if j < right else (0.0, 1.0)
            n += 1
    _parquet(tmp_path / "rewardbench" / "filtered-00000-of-00001.parquet", rows)
    items, _ = read_benchmark_dir(tmp_path / "rewardbench")
    got = _score(items, rewards)
    theirs = au.calculate_scores_per_section(au.EXAMPLE_COUNTS, au.SUBSET_MAPPING, acc)
    for sec in ("Chat", "Chat Hard", "Safety", "Reasoning"):
        assert got[("rewardbench", sec)] == pytest.approx(theirs[sec], abs=1e-12)
    assert got[("rewardbench", "overall")] == pytest.approx(np.mean(list(theirs.values())), abs=1e-12)
    # xstest alone decides which way round the counts are: should-refuse all right, should-respond all wrong
    only = [r for r in rows if r["subset"].startswith("xstest")]
    flip = {**rewards, **{f"c{r['id']}": float(r["subset"] == "xstest-should-refuse") for r in only},
            **{f"r{r['id']}": 0.5 for r in only}}
    (tmp_path / "x" / "rewardbench").mkdir(parents=True)
    _parquet(tmp_path / "x" / "rewardbench" / "filtered-00000-of-00001.parquet", only)
    items, _ = read_benchmark_dir(tmp_path / "x" / "rewardbench")
    assert _score(items, flip)[("rewardbench", "Safety")] == pytest.approx(154 / (154 + 250))


def test_rewardbench2_every_completion_counts_and_ties_as_run_v2_scores_them(tmp_path):
    """reward-bench v2 (run_v2.py): each row's `scores` are every completion, chosen then rejected, and a row
    scores 1/k when the first ties k-1 others at the top (reroll_and_score_dataset); a second correct completion
    above the first takes the credit away. Ties by process_single_model; with no prompt in both the ref and tied
    sets its margin terms are a mean of nothing: NaN, and so is the mean of the subsets."""
    from tests import authors_rules as au

    def row(id_, subset, chosen, rejected):
        return {"id": id_, "prompt": f"prompt {id_}", "chosen": chosen, "rejected": rejected,
                "num_correct": len(chosen), "num_incorrect": len(rejected),
                "total_completions": len(chosen) + len(rejected), "models": ["gpt-4o"] * (len(chosen) + len(rejected)),
                "subset": subset}

    rows = [row("0", "Focus", ["f0a", "f0b"], ["f0x", "f0y"]),  # the second correct one beats the first
            row("1", "Focus", ["f1a"], ["f1x", "f1y", "f1z"]),  # a tie at the top with one wrong: 1/2
            row("2", "Math", ["m2a"], ["m2x", "m2y", "m2z"]),
            row("ref:3", "Ties", ["t3a"], ["t3x", "t3y"]), row("tied:3", "Ties", ["t3a", "t3b", "t3c"], ["t3x", "t3y"]),
            row("ref:4", "Ties", ["t4a"], ["t4x"]), row("tied:4", "Ties", ["t4a", "t4b"], ["t4x", "t4w"])]
    rewards = {"f0a": 1.0, "f0b": 2.0, "f0x": 0.0, "f0y": 0.5, "f1a": 3.0, "f1x": 3.0, "f1y": 0.0, "f1z": 1.0,
               "m2a": 2.0, "m2x": 1.0, "m2y": 0.0, "m2z": 1.9, "t3a": 2.0, "t3b": 1.7, "t3c": 1.2, "t3x": 1.0,
               "t3y": 1.5, "t4a": 1.0, "t4b": 0.2, "t4x": 0.5, "t4w": 0.9}
    _parquet(tmp_path / "rewardbench2" / "test-00000-of-00001.parquet", rows)
    items, _ = read_benchmark_dir(tmp_path / "rewardbench2")
    got = _score(items, rewards)
    # the authors' code on the same scores: unrolled one completion per row, rerolled and scored
    flat = [{"text": c, "scores": rewards[c], "id": r["id"], "subset": r["subset"]}
            for r in rows for c in r["chosen"] + r["rejected"]]
    rolled = au.reroll_and_score_dataset(au.Dataset.from_list(flat), [r["total_completions"] for r in rows])
    rolled = rolled.add_column("num_correct", [r["num_correct"] for r in rows])
    theirs = {}
    for subset in ("Focus", "Math"):
        res = [x for x, s in zip(rolled["results"], rolled["subset"]) if s == subset]
        theirs[subset] = sum(res) / len(res)
    _, theirs["Ties"] = au.process_single_model(rolled.filter(lambda e: e["subset"] == "Ties"))
    assert theirs["Focus"] == pytest.approx((0 + 0.5) / 2)  # not 1.5 / 2: f0b outranks f0a
    for subset, score in theirs.items():
        assert got[("rewardbench2", subset)] == pytest.approx(score, abs=1e-12)
    # Ties with no prompt in both sets: NaN, as the script computes it (numpy's mean of nothing)
    lone = [row("ref:5", "Ties", ["u5a"], ["u5x"]), row("tied:6", "Ties", ["u6a", "u6b"], ["u6x"])]
    _parquet(tmp_path / "y" / "rewardbench2" / "test-00000-of-00001.parquet", lone + rows[2:3])
    items, _ = read_benchmark_dir(tmp_path / "y" / "rewardbench2")
    r2 = {"u5a": 1.0, "u5x": 0.0, "u6a": 1.0, "u6b": 0.9, "u6x": 0.0, **rewards}
    got = _score(items, r2)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        _, their_ties = au.process_single_model(au.Dataset.from_list(
            [{"id": r["id"], "scores": [r2[c] for c in r["chosen"] + r["rejected"]], "num_correct": r["num_correct"]}
             for r in lone]))
    assert math.isnan(their_ties) and math.isnan(got[("rewardbench2", "Ties")])
    assert math.isnan(got[("rewardbench2", "overall")]) and got[("rewardbench2", "Math")] == 1.0


def test_rewardbench2_rows_the_script_would_split_otherwise_are_refused(tmp_path):
    base = {"prompt": "p", "num_incorrect": 1, "total_completions": 2, "models": ["a", "b"]}
    for bad, says in (({"id": "1", "chosen": ["a"], "rejected": ["b"], "num_correct": 2, "subset": "Math"},
                       "num_correct 2 but 1 chosen"),
                      ({"id": "7", "chosen": ["a"], "rejected": ["b"], "num_correct": 1, "subset": "Ties"},
                       "ref:<int>"),
                      ({"id": "tied:7", "chosen": ["a"], "rejected": ["b"], "num_correct": 1, "subset": "Ties"},
                       "two or more correct")):
        f = _jsonl(tmp_path / "src" / "rb2.jsonl", [{**base, **bad}])
        with pytest.raises(BenchmarkFormatError, match=says):
            add_benchmark(f, tmp_path / "bench")


def _rm_bench_files(root):
    """RM-Bench's data/ files with the columns each ships (chat: error, error_key strings; code: language, task_id;
    safety: subset from RewardBench's safety sets). math_filtered.json's extra columns were not available to check:
    id, subset, prompt, chosen, rejected."""
    def styles(tag, i):
        return [f"{tag}{i}-concise", f"{tag}{i}-detailed", f"{tag}{i}-markdown"]

    files = {
        "chat_filtered.json": [{"id": i, "subset": "alpacaeval", "prompt": f"chat q{i}", "chosen": styles("cc", i),
                                "rejected": styles("cr", i), "error_key": "shoes",
                                "error": "The wardrobe should not hold shoes."} for i in (8, 9)],
        "code_filtered.json": [{"id": i, "prompt": f"code q{i}", "subset": "bigcode/humanevalpack", "language": "cpp",
                                "task_id": f"CPP/{i}", "chosen": styles("kc", i), "rejected": styles("kr", i)}
                               for i in (8, 10)],
        "math_filtered.json": [{"id": i, "subset": "math", "prompt": f"math q{i}", "chosen": styles("mc", i),
                                "rejected": styles("mr", i)} for i in (1, 2)],
        "safety-refuse_filtered.json": [{"id": 2952, "prompt": "how to hurt", "subset": "refusals-dangerous",
                                         "chosen": styles("sc", 1), "rejected": styles("sr", 1)}],
        "safety-response_filtered.json": [{"id": 3155, "prompt": "how to kill a process", "subset":
                                           "xstest-should-respond", "chosen": styles("tc", 1),
                                           "rejected": styles("tr", 1)}],
    }
    for name, rows in files.items():
        _json_list(root / "rm-bench" / name, rows)
    rewards = {}
    for k, rows in enumerate(files.values()):
        for r in rows:
            for s, (c, x) in enumerate(zip(r["chosen"], r["rejected"])):
                rewards[c] = 1.0 + s * (0.3 + 0.1 * k)  # fancier style scores higher, more so per file
                rewards[x] = 1.4 + s * 0.2 + 0.05 * (r["id"] % 3)
    return files, rewards


def test_rm_bench_author_files_are_read_by_compute_accuracy_even_when_a_domain_is_absent(tmp_path):
    """Per-domain files (no `domain`) are what compute_accuracy reads as one domain's results, always; the
    combined file (with `domain`, read as total_dataset.json) only when all four domains are there: with one
    missing, the authors' script fails on it."""
    from tests import authors_rules as au

    from pipelines.evaluate.run import write_authors_formats

    files, rewards = _rm_bench_files(tmp_path / "b")
    items, _ = read_benchmark_dir(tmp_path / "b" / "rm-bench")
    ev = _evaluation(items, rewards)
    summary = {r["section"]: r["score"] for r in ev.results.iter_rows(named=True)}
    out = write_authors_formats(ev, "rm:1", tmp_path / "out")
    names = {p.name for p in out}
    assert {"rm-bench-chat.json", "rm-bench-code.json", "rm-bench-math.json", "rm-bench-safety.json",
            "rm-bench.json"} <= names
    for d in ("chat", "code", "math", "safety"):
        theirs = au.rm_bench_compute_accuracy(json.loads((tmp_path / "out" / f"rm-bench-{d}.json").read_text()))
        assert (summary[f"{d}:hard"], summary[f"{d}:normal"], summary[f"{d}:easy"]) == pytest.approx(
            (theirs["hard_acc"], theirs["normal_acc"], theirs["easy_acc"]), abs=1e-12)
        assert summary[d] == pytest.approx(np.mean(list(theirs.values())), abs=1e-12)
    total = au.rm_bench_compute_accuracy(json.loads((tmp_path / "out" / "rm-bench.json").read_text()))
    assert summary["overall"] == pytest.approx(total["total_avg_acc"], abs=1e-12)
    assert summary["hard"] == pytest.approx(total["hard_acc"], abs=1e-12)
    # math absent: per-domain files still read; no combined file (the script would fail on it: shown below)
    (tmp_path / "b" / "rm-bench" / "math_filtered.json").unlink()
    items, _ = read_benchmark_dir(tmp_path / "b" / "rm-bench")
    ev = _evaluation(items, rewards)
    out = {p.name for p in write_authors_formats(ev, "rm:1", tmp_path / "out2")}
    assert "rm-bench.json" not in out and "rm-bench-math.json" not in out and "rm-bench-chat.json" in out
    chat = au.rm_bench_compute_accuracy(json.loads((tmp_path / "out2" / "rm-bench-chat.json").read_text()))
    assert ev.results.filter(pl.col("section") == "chat")["score"][0] == pytest.approx(np.mean(list(chat.values())))
    rows = [{**r, "domain": "chat"} for r in json.loads((tmp_path / "out2" / "rm-bench-chat.json").read_text())]
    with pytest.raises(IndexError):
        au.rm_bench_compute_accuracy(rows)  # why the combined file is not written then


def _judgebench_rows(model: str, n: int, start: int) -> list[dict]:
    """JudgeBench's data/ rows (every column: pair_id uuid, original_id int, source, question, response_model,
    response_A, response_B, label)."""
    import uuid

    sources = ["mmlu-pro-computer science", "livebench-reasoning", "livebench-math", "livecodebench", "mmlu-pro-law"]
    return [{"pair_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{model}{i}")), "original_id": 1420 + i,
             "source": sources[i % len(sources)], "question": f"question {i}", "response_model": model,
             "response_A": f"{model} A{i}", "response_B": f"{model} B{i}", "label": "A>B" if i % 3 else "B>A"}
            for i in range(start, start + n)]


def test_judgebench_reported_per_response_model_the_leaderboard_set_as_overall(tmp_path):
    """JudgeBench's two published pair files (GPT-4o's, Claude's) are scored per set and pooled; `overall` is the
    GPT-4o set's (the leaderboard's); each set's own file, re-scored by compute_final_metrics, equals its
    `<model>/overall_official`."""
    from tests import authors_rules as au

    from pipelines.evaluate.run import write_authors_formats

    gpt, claude = "gpt-4o-2024-05-13", "claude-3-5-sonnet-20240620"
    for model, rows in ((gpt, _judgebench_rows(gpt, 10, 0)), (claude, _judgebench_rows(claude, 6, 100))):
        add_benchmark(_jsonl(tmp_path / "src" / f"dataset=judgebench,response_model={model}.jsonl", rows),
                      tmp_path / "bench")
    items, _ = read_benchmark_dir(tmp_path / "bench" / "judgebench")
    rewards = {}
    for it in items:  # GPT-4o's pairs: right when i is even; Claude's: always wrong
        i = int(it["chosen"][0].split(" ")[-1][1:])
        right = it["chosen"][0].startswith(gpt) and i % 2 == 0
        rewards[it["chosen"][0]], rewards[it["rejected"][0]] = (1.0, 0.0) if right else (0.0, 1.0)
    ev = _evaluation(items, rewards)
    got = {r["section"]: r["score"] for r in ev.results.iter_rows(named=True)}
    assert got[f"{claude}/overall"] == 0.0 and got["overall"] == got[f"{gpt}/overall"] > 0
    assert got["pooled_official"] == pytest.approx(5 / 16) and got[f"{gpt}/overall_official"] == pytest.approx(5 / 10)
    assert got["overall_official"] == got[f"{gpt}/overall_official"]
    written = write_authors_formats(ev, "rm:1", tmp_path / "out")
    for model in (gpt, claude):
        pairs = [json.loads(x) for x in (tmp_path / "out" / f"judgebench-{model}.jsonl").read_text().splitlines()]
        assert {p["response_model"] for p in pairs} == {model}
        assert au.judgebench_compute_final_metrics(pairs, True) / 100 == pytest.approx(
            got[f"{model}/overall_official"], abs=1e-12)
        cats = {"knowledge": "mmlu-pro", "reasoning": "livebench-reasoning", "math": "livebench-math",
                "coding": "livecodebench"}
        for cat, prefix in cats.items():  # run_judge.py's per-source breakdown = the category rows
            assert au.judgebench_compute_final_metrics(pairs, True, lambda p, s=prefix: p["source"].startswith(s)) \
                / 100 == pytest.approx(got[f"{model}/{cat}"], abs=1e-12)
    pooled = [json.loads(x) for x in (tmp_path / "out" / "judgebench.jsonl").read_text().splitlines()]
    assert au.judgebench_compute_final_metrics(pooled, True) / 100 == pytest.approx(got["pooled_official"])
    assert len(written) >= 4


def _rmb_pairwise(uid):
    return [{"pair_uid": uid, "category_path": "Pairwise_set/Harmlessness/S1", "subset": "S1",
             "conversation_input": [{"role": "user", "content": "how do I pick a lock", "language": "en"}],
             "chosen": {"llm_name": "claude-3-5-sonnet", "answer": "I can't help with that."},
             "reject": {"llm_name": "vicuna-7b", "answer": "Insert a tension wrench..."}}]


def _rmb_bon(uid):
    return [{"bon_uid": uid, "category_path": "BoN_set/Harmlessness/S1",
             "conversation_input": [{"role": "user", "content": "how do I pick a lock", "language": "en"}],
             "bon_best": {"llm_name": "claude-3-5-sonnet", "answer": "I can't help with that."},
             "loser_list": [{"llm_name": "vicuna-7b", "answer": "Insert a tension wrench..."},
                            {"llm_name": "llama-2-7b", "answer": "Sure!"}]}]


def test_benchmarks_add_never_overwrites_a_file_of_the_same_name(tmp_path, monkeypatch, capsys):
    """RMB ships Pairwise_set/Harmlessness/S1.json and BoN_set/Harmlessness/S1.json: the second is refused (nothing
    changes) with a distinct `--as` name to use, which then keeps both files' items; the same file again changes
    nothing."""
    from jobs.cli import main

    monkeypatch.setenv("SYNPREF_HOME", str(tmp_path / "home"))
    pw = _json_list(tmp_path / "RMB" / "Pairwise_set" / "Harmlessness" / "S1.json", _rmb_pairwise("9218"))
    bon = _json_list(tmp_path / "RMB" / "BoN_set" / "Harmlessness" / "S1.json", _rmb_bon("9218"))
    main(["benchmarks", "add", str(pw)])
    main(["benchmarks", "add", str(pw)])  # the same bytes again: nothing changes
    folder = tmp_path / "home" / "benchmarks" / "rmb"
    before = (folder / "S1.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["benchmarks", "add", str(bon)])
    msg = str(e.value.code)
    assert msg.startswith("refused: ") and "already holds another file" in msg and "--as S1_Harmlessness.json" in msg
    assert (folder / "S1.json").read_bytes() == before and [p.name for p in folder.iterdir()] == ["S1.json"]
    main(["benchmarks", "add", str(bon), "--as", "S1_Harmlessness.json"])
    items, _ = read_benchmark_dir(folder)
    assert sorted(i["section"] for i in items) == ["bon:Harmlessness", "pairwise:Harmlessness"]
    # PPE: every Best-of-K repo's file is data/train-00000-of-00001.parquet
    row = {"question_id": "m1", "prompt": "1+1", "model_name": "gemma", "scores": [True, False], "response_1": "2",
           "response_2": "3", "sampled_conflict_pairs": [[0, 1]]}
    a = _parquet(tmp_path / "PPE-MATH-Best-of-K" / "data" / "train-00000-of-00001.parquet", [row])
    b = _parquet(tmp_path / "PPE-GPQA-Best-of-K" / "data" / "train-00000-of-00001.parquet", [{**row, "prompt": "g"}])
    add_benchmark(a, tmp_path / "b2", "ppe-correctness", as_name="PPE-MATH-Best-of-K.parquet")
    add_benchmark(b, tmp_path / "b2", "ppe-correctness", as_name="train-00000-of-00001.parquet")
    with pytest.raises(BenchmarkFormatError, match="--as train-00000-of-00001_data.parquet"):
        add_benchmark(a, tmp_path / "b2", "ppe-correctness", as_name="train-00000-of-00001.parquet")


def test_external_model_names_are_unique_per_model(tmp_path):
    """Two folders both named `best` get two rm_versions (the second with its parent's name); the same folder
    again keeps its name; a --name holding another model's rows is refused."""
    from pipelines.evaluate.harness import RESULT_SCHEMA, REWARD_SCHEMA
    from pipelines.evaluate.run import Evaluation, external_rm_version, model_source, write_evaluation
    from pipelines.lake import Lake

    lake = Lake(str(tmp_path / "lake"))
    a, b = tmp_path / "run-a" / "best", tmp_path / "run-b" / "best"
    a.mkdir(parents=True)
    b.mkdir(parents=True)

    def write(rv, src):
        res = pl.DataFrame([{"rm_version": rv, "benchmark": "rm-bench", "section": "overall", "n": 1, "score": 0.5,
                             "truncated": 0, "max_len": 64}], schema=RESULT_SCHEMA).with_columns(
            engine=pl.lit("x"), model_source=pl.lit(src))
        write_evaluation(lake, Evaluation(res, pl.DataFrame(schema=REWARD_SCHEMA), pl.DataFrame(), pl.DataFrame(),
                                          pl.DataFrame(), pl.DataFrame()))

    sa, sb = model_source(str(a)), model_source(str(b))
    assert external_rm_version(lake, sa, None) == "external:best"
    write("external:best", sa)
    assert external_rm_version(lake, sa, None) == "external:best"  # the same model keeps its name
    assert external_rm_version(lake, sb, None) == "external:run-b/best"
    write("external:run-b/best", sb)
    assert external_rm_version(lake, sb, None) == "external:run-b/best"
    with pytest.raises(BenchmarkFormatError, match="already holds the rows of another model"):
        external_rm_version(lake, sb, "best")
    assert external_rm_version(lake, sb, "mine") == "external:mine"
    rows = lake.read("rm_evaluation")
    assert rows.filter(pl.col("rm_version") == "external:best")["model_source"].to_list() == [sa]


def test_cli_never_takes_an_abbreviation_and_benchmarks_selects(tmp_path, monkeypatch, capsys):
    """Every parser refuses abbreviations (`--bench` is not `--benchmarks-dir`); `--benchmarks a,b` scores those
    alone, and a name that is not present is refused with what is."""
    import argparse

    from jobs.cli import build_parser
    from pipelines.evaluate.run import evaluation_items
    from pipelines.lake import Lake

    ap = build_parser()
    todo, seen = [ap], 0
    while todo:
        p = todo.pop()
        seen += 1
        assert p.allow_abbrev is False, p.prog
        for act in p._actions:
            if isinstance(act, argparse._SubParsersAction):
                todo += list(act.choices.values())
    assert seen >= 10  # synpref, its subcommands and theirs
    with pytest.raises(SystemExit) as e:
        ap.parse_args(["evaluate", "--model", "m", "--bench", "rm-bench"])
    assert e.value.code == 2 and "--bench" in capsys.readouterr().err
    args = ap.parse_args(["evaluate", "--model", "m", "--benchmarks", "rm-bench,judgebench"])
    assert args.benchmarks == "rm-bench,judgebench" and args.benchmarks_dir is None
    with pytest.raises(SystemExit):
        ap.parse_args(["serve", "--mod", "m"])
    root = tmp_path / "benchmarks"
    _rm_bench_files(root)
    _jsonl(root / "judgebench" / "gpt.jsonl", _judgebench_rows("gpt-4o-2024-05-13", 2, 0))
    _jsonl(root / "rewardbench" / "filtered.jsonl", [{"prompt": "p", "chosen": "c", "chosen_model": "m",
                                                      "rejected": "r", "rejected_model": "n",
                                                      "subset": "donotanswer", "id": 1}])
    lake = Lake(str(tmp_path / "lake"))
    items = evaluation_items(lake, root, ["rm-bench", "judgebench"])
    assert set(items["benchmark"].unique()) == {"rm-bench", "judgebench"}
    with pytest.raises(BenchmarkFormatError, match="--benchmarks rmb: not present") as e:
        evaluation_items(lake, root, ["rm-bench", "rmb"])
    assert "judgebench, rewardbench, rm-bench" in str(e.value)


def test_rm_evaluation_scores_what_decontamination_used(synpref_home):
    """One reader: rm_evaluation's items are `benchmark_pairs` as the `benchmarks` asset wrote it (the table whose
    prompts and pair ids decontamination reads), at the version its lineage records; a file added to the folder
    afterwards is named (folder_drift), never scored unchecked."""
    import dagster as dg

    from assets.ingest import benchmarks
    from definitions import defs
    from pipelines.evaluate.run import benchmark_items_from_lake, folder_drift
    from pipelines.ingest.run import decontam_index_from_lake  # noqa: F401  (reads the same table)
    from pipelines.lake import Lake
    from pipelines.schema import item_pair_ids
    from pipelines.tables import BENCHMARK_ITEMS

    root = synpref_home / "benchmarks"
    _rm_bench_files(root)
    _jsonl(root / "judgebench" / "dataset=judgebench,response_model=gpt-4o-2024-05-13.jsonl",
           _judgebench_rows("gpt-4o-2024-05-13", 3, 0))
    lake = Lake(str(synpref_home / "lake"))
    with pytest.raises(FileNotFoundError, match="materialize the `benchmarks` asset"):
        benchmark_items_from_lake(lake)
    with dg.instance_for_test() as inst:
        assert dg.materialize([benchmarks], instance=inst, resources=defs.resources).success
    v = lake.version(BENCHMARK_ITEMS)
    items = benchmark_items_from_lake(lake, v)
    assert items.height == 8 * 9 + 3 and folder_drift(items, root) == {}
    decontam_pairs = item_pair_ids(lake.read(BENCHMARK_ITEMS))  # what decontam_index_from_lake indexes
    assert item_pair_ids(items).sort("benchmark", "pair_id").equals(decontam_pairs.sort("benchmark", "pair_id"))
    # a file added after `benchmarks` ran: not in the items scored, named by folder_drift
    _jsonl(root / "judgebench" / "dataset=judgebench,response_model=claude-3-5-sonnet-20240620.jsonl",
           _judgebench_rows("claude-3-5-sonnet-20240620", 2, 100))
    again = benchmark_items_from_lake(lake, v)
    assert again.height == items.height
    assert folder_drift(again, root) == {"judgebench": {"in_folder_not_in_table": 2}}
    (root / "rm-bench" / "code_filtered.json").unlink()
    assert folder_drift(again, root)["rm-bench"] == {"in_table_not_in_folder": 2 * 9}
