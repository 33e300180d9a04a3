import json

import httpx
import polars as pl
import pytest

from pipelines.review.exchange import export_tasks, import_verdicts
from pipelines.review.ledger import VerdictIn, agreement_by_annotator, append_verdicts, read_verdicts, resolve
from pipelines.review.queue import QUEUE, build_queue
from pipelines.review.seed import build_seed
from pipelines.synth.reviewer import simulated_verdicts


def _v(pid, who, choice, order="chosen_first", role="annotator"):
    return VerdictIn(pair_id=pid, annotator=who, order_shown=order, choice=choice, role=role)


def test_prefers_unswaps_the_order_shown():
    assert _v("p", "a", "1").prefers() == "chosen"
    assert _v("p", "a", "1", "rejected_first").prefers() == "rejected"
    assert _v("p", "a", "2", "rejected_first").prefers() == "chosen"
    with pytest.raises(ValueError):
        _v("p", "a", "3").prefers()


def test_ledger_is_append_only_and_resolution_is_derived(lake):
    append_verdicts(lake, [_v("p1", "a", "1"), _v("p1", "b", "1"), _v("p1", "c", "2"),
                           _v("p2", "a", "undecidable"), _v("p3", "a", "1"), _v("p3", "b", "2"),
                           _v("p4", "a", "1"), _v("p4", "b", "2"), _v("p4", "lead", "2", role="lead")])
    append_verdicts(lake, [_v("p1", "c", "1")])  # c changes their mind: a new row, the old one stays
    v = read_verdicts(lake)
    assert v.height == 10 and v["verdict_id"].n_unique() == 10
    res = {r["pair_id"]: r for r in resolve(v).iter_rows(named=True)}
    assert res["p1"]["resolved"] == "chosen" and res["p1"]["agreement"] == 1.0  # latest vote per annotator
    assert res["p2"]["resolved"] == "discard" and res["p3"]["resolved"] == "discard"  # undecidable / tie
    assert (res["p4"]["resolved"], res["p4"]["how"]) == ("rejected", "adjudication")
    agr = {r["annotator"]: r["agreement"] for r in agreement_by_annotator(v).iter_rows(named=True)}
    assert agr["a"] < 1.0 and set(agr) == {"a", "b", "c", "lead"}


def _append_as(lake_root: str, who: str, go) -> None:
    """A separate writer process: waits for the shared start event, then appends five verdicts one by one."""
    from pipelines.lake import Lake

    assert go.wait(120), "the test never released the writers"
    for i in range(5):
        append_verdicts(Lake(lake_root), [VerdictIn(pair_id=f"{who}{i}", annotator=who, order_shown="chosen_first",
                                                    choice="1")])


def test_two_processes_appending_to_the_same_ledger_lose_nothing(lake):
    """As two review servers (or two Dagster runs) would: separate processes, one Delta table, no shared lock;
    Delta's optimistic commits keep every row."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_append_as, args=(lake.root, who, go)) for who in ("alice", "bob")]
    for p in procs:
        p.start()
    go.set()  # both start appending at once
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    v = read_verdicts(lake)
    assert v.height == 10 and v["verdict_id"].n_unique() == 10
    assert sorted(v["pair_id"]) == sorted([f"alice{i}" for i in range(5)] + [f"bob{i}" for i in range(5)])


def test_queue_prefers_objective_low_controversy_and_spreads_categories():
    rows = []
    for cat, obj, con in [("math", "objective", "low"), ("safety", "subjective", "high"),
                          ("advice", "subjective", "medium"), ("coding", "objective", "low")]:
        rows += [{"pair_id": f"{cat}{i}", "task_category": cat, "objectivity": obj, "controversiality": con}
                 for i in range(10)]
    q = build_queue(pl.DataFrame(rows), size=8, queue_version="v1")
    assert q.height == 8 and q.group_by("task_category").len()["len"].to_list() == [2, 2, 2, 2]
    assert q.sort("priority")["objectivity"].head(2).to_list() == ["objective", "objective"]
    q2 = build_queue(pl.DataFrame(rows), size=12, queue_version="v1", quotas={"math": 10, "coding": 2})
    assert set(q2["task_category"]) == {"math", "coding"} and q2.height == 12
    scores = pl.DataFrame({"pair_id": ["math3", "math7"], "p": [0.2, 0.51]})
    q3 = build_queue(pl.DataFrame(rows), size=4, queue_version="v2", rm_scores=scores, quotas={"math": 4})
    assert q3["pair_id"].head(2).to_list() == ["math3", "math7"] and "RM misjudges it" in q3["why"][0]
    # candidates with their text (as the review_queue asset reads them) queue the text: the app reads no raw_pairs
    texts = pl.DataFrame(rows).with_columns(history=pl.lit([{"role": "user", "content": "q"}]),
                                            chosen="A-" + pl.col("pair_id"), rejected="B-" + pl.col("pair_id"))
    q4 = build_queue(texts, size=4, queue_version="v3")
    assert (q4["chosen"] == "A-" + q4["pair_id"]).all() and q4["history"].list.len().min() == 1


def test_seed_orients_labels_and_splits(lake):
    pairs = pl.DataFrame({"pair_id": ["a", "b", "c"], "history": [[{"role": "user", "content": "q"}]] * 3,
                          "chosen": ["A1", "B1", "C1"], "rejected": ["A2", "B2", "C2"], "source": ["s"] * 3})
    append_verdicts(lake, [_v("a", "x", "1"), _v("b", "x", "2"), _v("c", "x", "undecidable")])
    seed = build_seed(read_verdicts(lake), pairs.lazy(), None, val_frac=0.3, test_frac=0.3)
    assert seed["pair_id"].to_list() == ["a", "b"]
    b = seed.row(1, named=True)
    assert (b["chosen"], b["rejected"], b["label_flipped"], b["label_origin"]) == ("B2", "B1", True, "human")
    # a pair's split is a function of its id alone: it never moves (a reported pair is never trained on later)
    from pipelines.review.seed import gold_split

    ids = [f"p{i}" for i in range(3000)]
    splits = [gold_split(i, 0.2, 0.2) for i in ids]
    share = {s: splits.count(s) / len(ids) for s in ("train", "gold_val", "gold_test")}
    assert abs(share["gold_test"] - 0.2) < 0.03 and abs(share["gold_val"] - 0.2) < 0.03
    assert [gold_split(i, 0.2, 0.2) for i in ids] == splits
    assert dict(zip(seed["pair_id"], seed["split"])) == {
        r["pair_id"]: gold_split(r["comparison_id"], 0.3, 0.3) for r in seed.iter_rows(named=True)}


def test_a_flipped_twin_shares_its_split_conflicts_are_kept_and_splits_are_pinned(lake):
    """(h, A, B) from one source and (h, B, A) from another are one comparison: one split. Humans preferring A in
    one and B in the other is a label conflict: both rows kept and marked. Rebuilding with other fractions never
    moves a comparison already split; new comparisons get the new fractions."""
    from pipelines.schema import comparison_id

    h = [{"role": "user", "content": "q"}]
    pairs = pl.DataFrame({"pair_id": ["x", "y", "z", "w"], "history": [h] * 4,
                          "chosen": ["A", "B", "C", "E"], "rejected": ["B", "A", "D", "F"], "source": ["s1", "s2"] * 2})
    # x: humans prefer A; y (the flipped twin of x): humans prefer B -> conflict
    append_verdicts(lake, [_v("x", "r", "1"), _v("y", "r", "1"), _v("z", "r", "1")])
    seed = build_seed(read_verdicts(lake), pairs.lazy(), None, val_frac=0.3, test_frac=0.3)
    by = {r["pair_id"]: r for r in seed.iter_rows(named=True)}
    assert by["x"]["comparison_id"] == by["y"]["comparison_id"] == comparison_id(h, "B", "A")
    assert by["x"]["split"] == by["y"]["split"]
    assert by["x"]["label_conflict"] and by["y"]["label_conflict"] and not by["z"]["label_conflict"]
    # everything to gold_test now: what was split keeps its split; only the new pair takes the new fractions
    append_verdicts(lake, [_v("w", "r", "1")])
    again = build_seed(read_verdicts(lake), pairs.lazy(), None, val_frac=0.0, test_frac=1.0, previous=seed)
    got = dict(zip(again["pair_id"], again["split"]))
    assert {p: got[p] for p in "xyz"} == {p: by[p]["split"] for p in "xyz"} and got["w"] == "gold_test"
    # an older seed without comparison ids (split by pair id) is honoured the same way
    old = seed.drop("comparison_id").with_columns(split=pl.lit("gold_test"))
    assert set(build_seed(read_verdicts(lake), pairs.lazy(), None, previous=old)["split"]) == {"gold_test"}


def test_simulated_reviewer_marks_itself_and_follows_truth():
    q = pl.DataFrame({"pair_id": [f"p{i}" for i in range(200)], "objectivity": ["objective"] * 200,
                      "overlap": [i < 20 for i in range(200)], "queue_version": ["v"] * 200})
    truth = {f"p{i}": i % 3 != 0 for i in range(200)}
    vs = simulated_verdicts(q, truth, annotators=2, error_rate=0.05)
    assert len(vs) == 220 and {v.origin for v in vs} == {"simulated"}
    right = sum((v.prefers() == "chosen") == truth[v.pair_id] for v in vs)
    assert 0.88 < right / len(vs) < 1.0


def test_export_import_round_trip_including_label_studio(tmp_path):
    items = pl.DataFrame({"pair_id": ["a", "b"], "history": [[{"role": "user", "content": "q"}]] * 2,
                          "chosen": ["good", "good2"], "rejected": ["bad", "bad2"], "task_category": ["math"] * 2,
                          "guideline": ["g"] * 2})
    for fmt in ("jsonl", "csv", "labelstudio"):
        assert export_tasks(items, str(tmp_path / f"t.{fmt}"), fmt) == 2
    tasks = json.loads((tmp_path / "t.labelstudio").read_text())
    # an annotator picks the candidate that holds the good answer, whatever side it was shown on
    for t in tasks:
        side = "left" if t["data"]["candidate_1"].startswith("good") else "right"
        t["annotations"] = [{"completed_by": {"email": "ann@x"}, "lead_time": 12.5,
                             "result": [{"type": "pairwise", "value": {"selected": side}}]}]
    (tmp_path / "done.json").write_text(json.dumps(tasks))
    vs = import_verdicts(str(tmp_path / "done.json"), "labelstudio")
    assert [v.prefers() for v in vs] == ["chosen", "chosen"] and vs[0].annotator == "ann@x"
    rows = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    (tmp_path / "v.jsonl").write_text("".join(json.dumps({"pair_id": r["pair_id"], "order_shown": r["order_shown"],
                                                          "choice": "B" if r["candidate_2"].startswith("good") else "A",
                                                          "annotator": "z"}) + "\n" for r in rows))
    assert [v.prefers() for v in import_verdicts(str(tmp_path / "v.jsonl"))] == ["chosen", "chosen"]


# --- the web app over a real server ------------------------------------------------------------------------------
XSS = '<script>alert("x")</script><b>bold</b>'


@pytest.fixture
def review_server(lake, tmp_path, serve_review):
    from pipelines.review.app import add_annotator

    pairs = pl.DataFrame({"pair_id": [f"p{i}" for i in range(4)], "history": [[{"role": "user", "content": XSS}]] * 4,
                          "chosen": [f"good {i} " + XSS for i in range(4)], "rejected": [f"bad {i}" for i in range(4)],
                          "source": ["s"] * 4, "shard": ["s/x"] * 4, "source_row": list(range(4))})
    lake.overwrite("raw_pairs", pairs)
    lake.overwrite(QUEUE, build_queue(pl.DataFrame({"pair_id": pairs["pair_id"], "task_category": ["math"] * 4,
                                                    "objectivity": ["objective"] * 4,
                                                    "controversiality": ["low"] * 4}),
                                      size=4, queue_version="v1", overlap_frac=1.0))
    ann = tmp_path / "annotators.json"
    tokens = {n: add_annotator(ann, n, "lead" if n == "lead" else "annotator") for n in ("alice", "bob", "lead")}
    return serve_review(lake.root, ann), tokens, ann


@pytest.mark.integration
def test_app_security_blind_review_and_escaping(review_server, lake):
    url, tok, ann = review_server
    assert "token_sha256" in ann.read_text() and tok["alice"] not in ann.read_text()  # stored hashed
    for path in ("/", "/lead", "/api/next", "/api/my-verdicts", "/api/pairs/p0/verdicts"):
        assert httpx.get(url + path).status_code == 401
        assert httpx.get(url + path, headers={"Authorization": "Bearer nope"}).status_code == 401
    A = {"Authorization": f"Bearer {tok['alice']}"}
    B = {"Authorization": f"Bearer {tok['bob']}"}
    page = httpx.get(url + "/", headers=A)
    assert page.status_code == 200
    assert "<script>alert" not in page.text and "&lt;script&gt;alert" in page.text  # rendered as text
    item = httpx.get(url + "/api/next", headers=A).json()["item"]
    r = httpx.post(url + "/api/verdicts", headers=A, json={"pair_id": item["pair_id"], "order_shown": item["order"],
                                                           "choice": "1", "note": XSS})
    assert r.status_code == 200
    # bob may not see alice's verdict before giving his own
    assert httpx.get(url + f"/api/pairs/{item['pair_id']}/verdicts", headers=B).status_code == 403
    first = httpx.post(url + "/api/verdicts", headers=B, json={"pair_id": item["pair_id"],
                                                               "order_shown": "chosen_first", "choice": "2"})
    assert first.json()["revised"] is False
    seen = httpx.get(url + f"/api/pairs/{item['pair_id']}/verdicts", headers=B).json()["verdicts"]
    assert {v["annotator"] for v in seen} == {"alice", "bob"}
    # nobody can write under another name: the author is the token's owner. Bob revising is a new row; his first
    # verdict stays in the ledger and the resolution counts his latest
    again = httpx.post(url + "/api/verdicts", headers=B, json={"pair_id": item["pair_id"],
                                                               "order_shown": "chosen_first", "choice": "1",
                                                               "annotator": "alice"})
    assert again.json()["revised"] is True
    v = read_verdicts(lake)
    assert v.filter(pl.col("annotator") == "alice").height == 1 and v.height == 3
    assert v.filter(pl.col("annotator") == "bob").sort("created_at")["prefers"].to_list() == ["rejected", "chosen"]
    res = resolve(v).filter(pl.col("pair_id") == item["pair_id"]).row(0, named=True)
    assert res["resolved"] == "chosen" and res["agreement"] == 1.0  # alice and bob's latest agree
    assert httpx.post(url + "/api/verdicts", headers=A, json={"pair_id": "nope", "order_shown": "chosen_first",
                                                              "choice": "1"}).status_code == 404
    assert httpx.post(url + "/api/verdicts", headers=A, json={"pair_id": "p1", "order_shown": "chosen_first",
                                                              "choice": "7"}).status_code == 422
    assert httpx.get(url + "/lead", headers=A).status_code == 403
    lead_page = httpx.get(url + "/lead", headers={"Authorization": f"Bearer {tok['lead']}"})
    assert lead_page.status_code == 200 and "alice" in lead_page.text and "discard rate" in lead_page.text


def test_a_comparison_two_sources_label_opposite_ways_is_queued_as_a_label_conflict(lake):
    """raw_pairs holds (h, A, B) from one source and (h, B, A) from another: the queued item says so (why and
    `label_conflict`), and the queue carries its text; a pair without a twin is not marked."""
    from pipelines.annotate.runner import ANNOTATIONS, ANNOTATION_SCHEMA
    from pipelines.review.plan import next_review_queue
    from pipelines.schema import RAW_PAIRS_SCHEMA, pair_id
    from tests.rm_helpers import synth_rows

    rows = synth_rows(6, seed=4)
    raw = [{**{k: r[k] for k in ("pair_id", "history", "chosen", "rejected")}, "source": "a", "shard": "a/0",
            "source_row": i} for i, r in enumerate(rows)]
    twin = rows[0]
    raw.append({"pair_id": pair_id(twin["history"], twin["rejected"], twin["chosen"]), "history": twin["history"],
                "chosen": twin["rejected"], "rejected": twin["chosen"], "source": "b", "shard": "b/0", "source_row": 0})
    frame = pl.DataFrame(raw)
    lake.overwrite("raw_pairs", frame.select([(pl.col(f.name) if f.name in frame.columns else pl.lit(None))
                                              .alias(f.name) for f in RAW_PAIRS_SCHEMA]).to_arrow().cast(RAW_PAIRS_SCHEMA))
    ann = pl.DataFrame([{"pair_id": r["pair_id"], "model": "m", "prompt_version": "v", "status": "ok",
                         "task_category": "math", "objectivity": "objective", "controversiality": "low"}
                        for r in raw])
    lake.overwrite(ANNOTATIONS, ann.select([(pl.col(c) if c in ann.columns else pl.lit(None)).cast(t).alias(c)
                                            for c, t in ANNOTATION_SCHEMA.items()]).to_arrow())
    plan = next_review_queue(lake, size=10, candidates_per_category=10, seed=0, stage1_fraction=1.0)
    q = plan.queue
    assert q.height == 7 and q["chosen"].null_count() == 0
    marked = set(q.filter(pl.col("label_conflict"))["pair_id"])
    assert marked == {twin["pair_id"], raw[-1]["pair_id"]}  # both orientations, each pointing at the other
    assert q.filter(pl.col("label_conflict"))["why"].str.contains("label conflict").all()
    assert not q.filter(~pl.col("label_conflict"))["why"].str.contains("label conflict").any()
