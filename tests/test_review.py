import json

import httpx
import polars as pl
import pytest

from pipelines.review.exchange import export_tasks, import_verdicts
from pipelines.review.ledger import (VERDICTS, VerdictIn, agreement_by_annotator, append_verdicts, read_verdicts,
                                     resolve, verdict_rows)
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
    assert res["p2"]["resolved"] == "discard" and res["p2"]["how"] == "single"  # undecidable
    # annotators who disagree leave the pair pending until a lead adjudicates; the adjudication is final
    assert (res["p3"]["resolved"], res["p3"]["how"]) == ("pending", "awaiting_adjudication")
    assert (res["p4"]["resolved"], res["p4"]["how"]) == ("rejected", "adjudication")
    agr = {r["annotator"]: r["agreement"] for r in agreement_by_annotator(v).iter_rows(named=True)}
    assert agr["a"] < 1.0 and set(agr) == {"a", "b", "c"}  # an adjudication is not a rater's vote


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


def test_the_loser_of_a_race_to_create_the_ledger_appends_to_the_winners_table(lake, monkeypatch):
    """Two first writers: the other process creates the table between our check and our commit, and delta-rs
    fails ours with "Metadata changed since last commit" (seen in the test above, rarely). The append goes again
    onto the table that now exists: both rows kept, none twice."""
    import pipelines.lake as lake_mod
    from deltalake.exceptions import CommitFailedError

    real = lake_mod.write_deltalake
    raced = []

    def racing(uri, data, **kw):
        if not raced:  # the other writer's create lands first; ours then fails as delta-rs fails it
            raced.append(True)  # (the other writer is another process: not through this process's ledger lock)
            other = verdict_rows([VerdictIn(pair_id="other", annotator="bob", order_shown="chosen_first",
                                            choice="1")])
            lake.append(VERDICTS, other.to_arrow())
            raise CommitFailedError("Failed to commit transaction: Metadata changed since last commit.")
        return real(uri, data, **kw)

    monkeypatch.setattr(lake_mod, "write_deltalake", racing)
    append_verdicts(lake, [VerdictIn(pair_id="mine", annotator="alice", order_shown="chosen_first", choice="2")],
                    compact_every=0)
    assert sorted(read_verdicts(lake)["pair_id"]) == ["mine", "other"]


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
    from pipelines.annotate.attributes import ANNOTATION_SCHEMA
    from pipelines.tables import ANNOTATIONS
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


# --- serving: leases, double annotation, adjudication, agreement, compaction -------------------------------------
class Clock:
    """A clock the test moves: lease expiry without sleeping."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _queue(n: int, overlap: set[int] = frozenset(), version: str = "q001") -> pl.DataFrame:
    return pl.DataFrame({"pair_id": [f"p{i}" for i in range(n)], "queue_version": [version] * n,
                         "priority": list(range(n)), "task_category": ["math"] * n,
                         "objectivity": ["objective"] * n, "controversiality": ["low"] * n, "why": ["w"] * n,
                         "overlap": [i in overlap for i in range(n)],
                         "history": [[{"role": "user", "content": f"q{i}"}] for i in range(n)],
                         "chosen": [f"A{i}" for i in range(n)], "rejected": [f"B{i}" for i in range(n)],
                         "label_conflict": [False] * n})


def _store(tmp_path, clock=None):
    from pipelines.review.store import ReviewStore

    return ReviewStore(tmp_path / "review.sqlite", clock=clock or Clock())


def test_leases_hand_each_item_to_one_annotator_and_expire_back_into_the_queue(tmp_path):
    from pipelines.review.ledger import verdict_rows

    clock = Clock()
    st = _store(tmp_path, clock)
    st.add_items(_queue(4, overlap={1}))
    a, b = st.claim("alice", 60), st.claim("bob", 60)
    assert (a.pair_id, b.pair_id) == ("p0", "p1")  # p0 needs one annotator: bob gets the next item
    assert st.claim("alice", 60).pair_id == "p0" and st.claim("alice", 60).renewed  # a reload: the same hold
    c = st.claim("carol", 60)
    assert c.pair_id == "p1"  # the double-annotated item: a second, different person
    assert st.claim("dave", 60).pair_id == "p2"  # p1 now has its two holders
    # alice closes her tab: the others' open pages keep renewing, hers does not; her lease runs out and p0 goes back
    # to the front of the queue
    clock.t += 40
    assert all(st.renew(who, pid, 60) for who, pid in (("bob", "p1"), ("carol", "p1"), ("dave", "p2")))
    clock.t += 21
    assert st.claim("erin", 60).pair_id == "p0"
    assert not st.renew("alice", "p0", 60)  # her hold is gone
    # bob labels p1: he cannot get it again, and a verdict releases his lease
    st.add_verdicts(verdict_rows([_v("p1", "bob", "1")]))
    assert all(x["annotator"] != "bob" for x in st.leases())
    nxt = st.claim("bob", 60)
    assert nxt.pair_id not in ("p1", "p0", "p2") and nxt.pair_id == "p3"
    assert st.progress("bob")["done"] == 1 and st.progress("bob")["in_batch"] == 1


def _claim_many(path: str, who: str, n: int, go, out) -> None:
    from pipelines.review.ledger import verdict_rows
    from pipelines.review.store import ReviewStore

    st = ReviewStore(path)
    assert go.wait(120), "the test never released the claimers"
    got = []
    for _ in range(n):
        lease = st.claim(who, 600)
        if lease is None:
            break
        got.append(lease.pair_id)
        st.add_verdicts(verdict_rows([VerdictIn(pair_id=lease.pair_id, annotator=who, order_shown="chosen_first",
                                                choice="1")]))
    out.put((who, got))


def test_concurrent_processes_never_claim_the_same_single_annotation_item(tmp_path):
    """Four server processes on one store (uvicorn --workers 4): every item needing one annotator goes to exactly
    one; the double-annotated ones to exactly two different people."""
    import multiprocessing

    st = _store(tmp_path)
    st.add_items(_queue(40, overlap=set(range(0, 40, 5))))
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claim_many, args=(st.path, f"w{i}", 40, go, out)) for i in range(4)]
    for p in procs:
        p.start()
    go.set()
    results = dict(out.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    taken = [pid for got in results.values() for pid in got]
    per = {pid: taken.count(pid) for pid in set(taken)}
    overlap = {f"p{i}" for i in range(0, 40, 5)}
    assert set(per) == {f"p{i}" for i in range(40)}  # everything served
    assert all(per[p] == (2 if p in overlap else 1) for p in per), per
    assert all(len(set(got)) == len(got) for got in results.values())  # nobody labels an item twice
    assert st.batch_status()["open"] == 0


def test_disagreement_goes_to_adjudication_and_the_adjudicated_verdict_wins_in_the_seed(lake, tmp_path):
    from pipelines.review.ledger import verdict_rows
    from pipelines.review.sync import LakeSync

    st = _store(tmp_path)
    q = _queue(3, overlap={0, 1})
    lake.overwrite(QUEUE, q)
    # p0: alice and bob disagree; p1: they agree; p2: one annotator
    append_verdicts(lake, [_v("p0", "alice", "1"), _v("p0", "bob", "2"), _v("p1", "alice", "1"),
                           _v("p1", "bob", "1"), _v("p2", "alice", "2")])
    assert LakeSync(lake, st).sync()["verdicts"] == 5
    assert st.item("p0")["disputed"] and not st.item("p1")["disputed"] and st.awaiting_adjudication() == 1
    assert st.claim_adjudication("alice", 60) is None  # an adjudicator is a third person
    lease = st.claim_adjudication("lena", 60)
    assert lease.pair_id == "p0" and st.claim_adjudication("olga", 60) is None  # one lead at a time
    pairs = q.select("pair_id", "history", "chosen", "rejected", source=pl.lit("s"))
    before = build_seed(read_verdicts(lake), pairs.lazy(), None)
    assert set(before["pair_id"]) == {"p1", "p2"}  # p0 waits for its adjudication, it is not guessed
    rows = verdict_rows([_v("p0", "lena", "2", role="lead")])  # the lead sides with bob
    from pipelines.review.ledger import append_verdict_rows

    append_verdict_rows(lake, rows)
    st.add_verdicts(rows)
    assert st.item("p0")["adjudicated"] and st.awaiting_adjudication() == 0
    # alice revising afterwards does not overturn the adjudication
    append_verdicts(lake, [_v("p0", "alice", "1")])
    seed = build_seed(read_verdicts(lake), pairs.lazy(), None)
    p0 = seed.filter(pl.col("pair_id") == "p0").row(0, named=True)
    assert (p0["chosen"], p0["how"], p0["label_flipped"]) == ("B0", "adjudication", True)
    assert set(seed["pair_id"]) == {"p0", "p1", "p2"}


def test_agreement_is_cohens_kappa_per_annotator_and_per_batch():
    from pipelines.review.ledger import agreement_by_batch

    labels_a = ["1", "1", "1", "2", "2", "1", "2", "1", "1", "undecidable"]
    labels_b = ["1", "1", "2", "2", "2", "1", "1", "1", "1", "undecidable"]
    vs = [_v(f"x{i}", "a", x) for i, x in enumerate(labels_a)] + [_v(f"x{i}", "b", x) for i, x in enumerate(labels_b)]
    vs += [_v("y0", "a", "1"), _v("y0", "c", "2"), _v("solo", "a", "1")]
    for v in vs:
        v.queue_version = "q002" if v.pair_id == "y0" else "q001"
    frame = verdict_rows_frame(vs)
    by = {r["annotator"]: r for r in agreement_by_annotator(frame).iter_rows(named=True)}
    assert by["b"]["overlap_items"] == 10 and by["b"]["agreement"] == 0.8
    # by hand: po = .8; b's marginals (c .6, r .3, u .1), a's (c .6, r .3, u .1): pe = .36+.09+.01 = .46
    assert abs(by["b"]["kappa"] - (0.8 - 0.46) / (1 - 0.46)) < 1e-9
    assert by["c"]["kappa"] is not None and by["c"]["agreement"] == 0.0
    batch = {r["queue_version"]: r for r in agreement_by_batch(frame).iter_rows(named=True)}
    assert batch["q001"]["overlap_items"] == 10 and abs(batch["q001"]["kappa"] - (0.8 - 0.46) / 0.54) < 1e-9
    assert batch["q002"]["overlap_items"] == 1 and batch["q002"]["agreement"] == 0.0
    # everyone says the same one label: agreement 1, kappa undefined (None), not a made-up number
    same = verdict_rows_frame([_v("z", "a", "1"), _v("z", "b", "1")])
    assert agreement_by_annotator(same)["kappa"].to_list() == [None, None]


def verdict_rows_frame(vs):
    from pipelines.review.ledger import verdict_rows

    return verdict_rows(vs)


def test_the_ledger_compacts_and_the_store_follows_it_by_file(lake, tmp_path):
    from pipelines.review.ledger import VERDICTS, compact_ledger
    from pipelines.review.sync import LakeSync

    st = _store(tmp_path)
    lake.overwrite(QUEUE, _queue(30))
    sync = LakeSync(lake, st)
    for i in range(24):  # one commit per verdict, as the app writes; compaction every 10 versions
        append_verdicts(lake, [_v(f"p{i}", "alice", "1")], compact_every=10)
        if i == 11:
            assert sync.sync()["verdicts"] == 12
    files = len(lake.delta(VERDICTS).file_uris())
    assert files <= 5, files  # 24 appends, compacted at versions 10 and 20
    got = sync.sync()
    assert got["verdicts"] == 12 and sync.sync() == {"items": 0, "verdicts": 0, "checks": 0}  # nothing new: no reads
    stats = compact_ledger(lake)
    assert stats["compacted"] and stats["files_after"] == 1
    v = read_verdicts(lake)
    assert v.height == 24 and v["verdict_id"].n_unique() == 24
    assert sync.sync()["verdicts"] == 0 and st.progress("alice")["done"] == 24  # the rewritten file adds nothing


@pytest.mark.integration
def test_app_leases_adjudication_agreement_and_no_queue_read_per_request(lake, tmp_path, serve_review):
    import shutil

    from pipelines.review.app import add_annotator

    lake.overwrite(QUEUE, _queue(5, overlap={0}))
    ann = tmp_path / "annotators.json"
    tok = {n: add_annotator(ann, n, "lead" if n == "lena" else "annotator") for n in ("alice", "bob", "carol", "dave",
                                                                                      "lena")}
    H = {n: {"Authorization": f"Bearer {t}"} for n, t in tok.items()}
    clock = Clock()
    url = serve_review(lake.root, ann, lease_ttl_s=30, clock=clock)
    nxt = {n: httpx.get(url + "/api/next", headers=H[n]).json() for n in ("alice", "bob", "carol")}
    assert [nxt[n]["item"]["pair_id"] for n in ("alice", "bob", "carol")] == ["p0", "p0", "p1"]  # p0 is for two
    assert nxt["alice"]["lease_expires_at"] == clock.t + 30
    # alice and bob disagree: p0 goes to the adjudication queue
    for who, wants in (("alice", "chosen_first"), ("bob", "rejected_first")):  # alice prefers chosen, bob rejected
        it = nxt[who]["item"]
        choice = "1" if it["order"] == wants else "2"
        r = httpx.post(url + "/api/verdicts", headers=H[who], json={"pair_id": "p0", "order_shown": it["order"],
                                                                    "choice": choice})
        assert r.status_code == 200 and r.json()["lease_held"] is True
    agr = httpx.get(url + "/api/agreement", headers=H["lena"]).json()
    assert agr["awaiting_adjudication"] == 1 and agr["by_batch"][0]["overlap_items"] == 1
    assert agr["by_batch"][0]["agreement"] == 0.0
    assert httpx.get(url + "/api/agreement", headers=H["alice"]).status_code == 403
    assert httpx.get(url + "/api/adjudications/next", headers=H["alice"]).status_code == 403
    adj = httpx.get(url + "/api/adjudications/next", headers=H["lena"]).json()["item"]
    assert adj["pair_id"] == "p0" and {v["annotator"] for v in adj["votes"]} == {"alice", "bob"}
    page = httpx.get(url + "/adjudicate", headers=H["lena"]).text
    assert "your verdict is final" in page and "alice" in page and "bob" in page
    assert httpx.post(url + "/api/adjudications", headers=H["bob"], json={
        "pair_id": "p0", "order_shown": "chosen_first", "choice": "1"}).status_code == 403
    assert httpx.post(url + "/api/adjudications", headers=H["lena"], json={
        "pair_id": "p2", "order_shown": "chosen_first", "choice": "1"}).status_code == 409  # nothing to settle
    r = httpx.post(url + "/api/adjudications", headers=H["lena"], json={
        "pair_id": "p0", "order_shown": adj["order"], "choice": "1" if adj["order"] == "rejected_first" else "2"})
    assert r.status_code == 200
    res = resolve(read_verdicts(lake)).filter(pl.col("pair_id") == "p0").row(0, named=True)
    assert (res["resolved"], res["how"]) == ("rejected", "adjudication")
    assert httpx.get(url + "/api/adjudications/next", headers=H["lena"]).json()["item"] is None
    # requests read the serving store, not the queue table: with the table gone the app still serves
    shutil.rmtree(lake.root + "/" + QUEUE)
    # carol closed her tab on p1: once her lease runs out dave gets it; before that he gets p2
    assert httpx.get(url + "/api/next", headers=H["dave"]).json()["item"]["pair_id"] == "p2"
    assert httpx.post(url + "/api/leases/release", headers=H["dave"], json={"pair_id": "p2"}).json()["released"]
    clock.t += 31
    assert httpx.post(url + "/api/leases/renew", headers=H["carol"], json={"pair_id": "p1"}).status_code == 409
    assert httpx.get(url + "/api/next", headers=H["dave"]).json()["item"]["pair_id"] == "p1"
    prog = httpx.get(url + "/api/progress", headers=H["alice"]).json()["progress"]
    assert (prog["done"], prog["in_batch"], prog["queue_version"]) == (1, 1, "q001")
    lead = httpx.get(url + "/lead", headers=H["lena"]).text
    assert 'id="agreement-batch"' in lead and "kappa" in lead and "holding now" in lead


def test_verdicts_arriving_together_share_one_ledger_commit_and_none_is_lost(lake, monkeypatch):
    """Eight requests submit while a commit is in flight: they go into the next commit together, and each returns
    only once its row is in the ledger."""
    import threading
    import time

    from pipelines.review import ledger as L

    gc = L.GroupCommit(lake, compact_every=0)
    real, calls = L.append_verdict_rows, []

    def first_waits(lk, rows, compact_every):
        if not calls:  # hold the first commit until the other seven are queued behind it
            deadline = time.monotonic() + 60
            while len(gc._pending) < 7:
                assert time.monotonic() < deadline, "the other submissions never queued"
                time.sleep(0.01)
        calls.append(rows.height)
        return real(lk, rows, compact_every)

    monkeypatch.setattr(L, "append_verdict_rows", first_waits)
    go, versions = threading.Barrier(8), {}

    def submit(i):
        go.wait(30)
        versions[i] = gc.append(L.verdict_rows([_v(f"p{i}", f"a{i}", "1")]))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(versions) == 8 and sorted(calls) == [1, 7]  # two commits for eight verdicts
    assert len(set(versions.values())) == 2
    v = read_verdicts(lake)
    assert v.height == 8 and set(v["pair_id"]) == {f"p{i}" for i in range(8)}
