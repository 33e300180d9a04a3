"""Benchmark files in their published layouts, read as published and scored as their authors' scripts score them
(hand-made files, hand-computed expected scores); refusal of what is not recognised; counted truncation that keeps
the special tokens a model reads."""

import json
import math

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
    # hard = above the diagonal, normal = the diagonal, easy = below), computed from rm-bench.json alone, equals
    # the summary exactly
    import json

    import numpy as np

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    rows = json.loads((tmp_path / "out" / "rm-bench.json").read_text())
    assert len(rows) == 4 and {r["domain"] for r in rows} == {"chat"} and sorted(r["id"] for r in rows) == [0, 1, 2, 3]
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
