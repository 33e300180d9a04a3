import gzip
import json

import polars as pl

from pipelines.ingest.decontaminate import NgramIndex
from pipelines.ingest.run import ingest_shard


def _write(path, rows, raw_lines=()):
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
        for line in raw_lines:
            fh.write(line + "\n")
    return str(path)


GOOD = [{"prompt": f"question {i}", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"} for i in range(20)]


def test_bad_rows_go_to_quarantine_and_counts_reconcile(lake, tmp_path):
    bad = [{"prompt": "q", "chosen": None, "rejected": "r"}, {"prompt": "q", "chosen": "same", "rejected": "same"},
           {"prompt": "q", "rejected": "r"}, {"prompt": "q", "chosen": "", "rejected": "r"}]
    path = _write(tmp_path / "a.jsonl", GOOD + bad + [GOOD[3]], ['{"prompt": "broken', "[1, 2]", "\xff"])
    rep = ingest_shard(lake, path, source="a", shard="a/a.jsonl", run_id="r1", batch_size=7)
    assert rep.reconciles
    assert (rep.kept, rep.duplicates, rep.quarantined) == (20, 1, 7)
    q = lake.read("quarantine")
    assert q.height == 7
    assert sorted(q["reason"].to_list()) == sorted(
        ["null_field", "identical_responses", "missing_field", "empty_text", "undecodable", "undecodable",
         "undecodable"])
    assert all(q["payload"].str.len_chars() > 0)  # the raw row is kept
    d = lake.read("duplicates")
    assert d.row(0, named=True)["kept_source_row"] == 3 and d.row(0, named=True)["source_row"] == 24


def test_reingest_is_a_noop_and_resume_after_a_crash(lake, tmp_path):
    full = _write(tmp_path / "full.jsonl", GOOD)
    # a crash after the first 8 rows were written: the shard's file then holds only those rows
    partial = _write(tmp_path / "partial.jsonl", GOOD[:8])
    rep = ingest_shard(lake, partial, source="s", shard="s/f.jsonl", run_id="r1")
    assert rep.kept == 8
    v = lake.version("raw_pairs")
    rep = ingest_shard(lake, full, source="s", shard="s/f.jsonl", run_id="r2", batch_size=5)
    assert (rep.kept, rep.already_present, rep.duplicates) == (12, 8, 0) and rep.reconciles
    rep = ingest_shard(lake, full, source="s", shard="s/f.jsonl", run_id="r3")
    assert (rep.kept, rep.already_present) == (0, 20)
    assert lake.read("raw_pairs").height == 20
    assert lake.version("raw_pairs") == v + 3  # 12 new rows in 3 batches of 5; the no-op rerun wrote nothing


def test_cross_source_duplicates_record_the_kept_row(lake, tmp_path):
    ingest_shard(lake, _write(tmp_path / "a.jsonl", GOOD[:5]), source="a", shard="a/x", run_id="r1")
    rep = ingest_shard(lake, _write(tmp_path / "b.jsonl", [GOOD[9], GOOD[2]]), source="b", shard="b/y",
                       run_id="r2")
    assert (rep.kept, rep.duplicates) == (1, 1)
    d = lake.read("duplicates").row(0, named=True)
    assert (d["source"], d["source_row"], d["kept_source"], d["kept_source_row"]) == ("b", 1, "a", 2)
    raw = lake.read("raw_pairs")
    assert raw["pair_id"].n_unique() == raw.height == 6


def test_decontamination_drops_13gram_overlap_and_reports_per_benchmark(lake, tmp_path):
    bench_prompt = "the quick brown fox jumps over the lazy dog near the old river bank today"
    idx = NgramIndex.build([("rb1", bench_prompt)])
    rows = [{"prompt": "Please: " + bench_prompt, "chosen": "a", "rejected": "b"},
            {"prompt": "the quick brown fox jumps over the lazy dog near the old river", "chosen": "a", "rejected": "b"},
            {"prompt": "the quick brown fox jumps over a lazy dog near the old river bank today", "chosen": "a",
             "rejected": "b"}]
    rep = ingest_shard(lake, _write(tmp_path / "c.jsonl", rows), source="c", shard="c/z", run_id="r", decontam=idx)
    assert rep.contaminated_by_benchmark == {"rb1": 2} and rep.kept == 1 and rep.reconciles
    assert set(lake.read("quarantine")["reason"]) == {"contaminated"}


def test_gzip_and_parquet_readers(lake, tmp_path):
    gz = tmp_path / "g.jsonl.gz"
    with gzip.open(gz, "wt") as fh:
        for r in GOOD[:4]:
            fh.write(json.dumps(r) + "\n")
    pq = tmp_path / "p.parquet"
    pl.DataFrame({"question": [r["prompt"] for r in GOOD[4:10]], "good": [r["chosen"] for r in GOOD[4:10]],
                  "bad": [r["rejected"] for r in GOOD[4:10]]}).write_parquet(pq)
    assert ingest_shard(lake, str(gz), source="g", shard="g/1", run_id="r").kept == 4
    rep = ingest_shard(lake, str(pq), source="p", shard="p/1", run_id="r",
                       mapping={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert rep.kept == 6 and rep.format == "trl"


def test_real_hh_rlhf(lake, hh_path):
    rep = ingest_shard(lake, hh_path, source="hh-rlhf", shard="hh-rlhf/test", run_id="r")
    assert rep.rows_read == 2312 and rep.reconciles
    assert rep.kept > 2250
    raw = lake.read("raw_pairs")
    # multi-turn transcripts become real message lists that end on a user turn
    lens = raw["history"].list.len()
    assert lens.max() > 3
    assert raw["history"].list.last().struct.field("role").unique().to_list() == ["user"]
    assert set(lake.read("quarantine")["reason"]) <= {"empty_text", "history_mismatch", "identical_responses"}


def test_id_index_is_exact_on_all_128_bits_and_knows_where_each_pair_lives():
    import numpy as np

    from pipelines.ingest.run import IdIndex

    idx = IdIndex(merge_every=2)
    a = "0123456789abcdef" + "0" * 16
    b = "0123456789abcdef" + "1" * 16  # same high half, different low half
    c = "f" * 32
    for ids, rows in (([a], [3]), ([c], [7]), ([b], [9])):  # 3 chunks: forces a merge
        hi, lo = IdIndex.split(ids)
        idx.add(hi, lo, np.full(1, idx.place("s", "s/1"), dtype=np.int32), np.array(rows))
    assert len(idx) == 3 and len(idx.chunks) == 1
    hi, lo = IdIndex.split([b, a, "e" * 32, c])
    place, row = idx.lookup(hi, lo)
    assert row.tolist() == [9, 3, -1, 7] and place.tolist() == [0, 0, -1, 0]
    assert idx.places[0] == ("s", "s/1")
    # randomized against a dict: probes in any order, many keys sharing a high half, several chunks
    rng = np.random.default_rng(0)
    big = IdIndex(merge_every=3)
    want: dict[tuple[int, int], int] = {}
    for chunk in range(7):
        k_hi = rng.integers(0, 50, 400, dtype=np.uint64)
        k_lo = rng.integers(0, 2**63, 400, dtype=np.uint64)
        rows = np.arange(chunk * 400, chunk * 400 + 400)
        big.add(k_hi, k_lo, np.zeros(400, dtype=np.int32), rows)
        want.update({(int(h), int(l_)): int(r) for h, l_, r in zip(k_hi, k_lo, rows)})
    keys = list(want)
    probe = [keys[i] for i in rng.permutation(len(keys))[:1000]] + [(3, 12345), (99, 1)]
    _, got = big.lookup(np.array([p[0] for p in probe], dtype=np.uint64), np.array([p[1] for p in probe],
                                                                                    dtype=np.uint64))
    assert got.tolist() == [want.get(p, -1) for p in probe]


def test_later_stages_quarantine_pairs_with_provenance_idempotently(lake, tmp_path):
    from pipelines.pool import quarantine_pairs

    ingest_shard(lake, _write(tmp_path / "a.jsonl", GOOD[:3]), source="a", shard="a/x", run_id="r1")
    pid = lake.read("raw_pairs").sort("source_row")["pair_id"][1]
    refused = pl.DataFrame({"pair_id": [pid], "detail": ["response alone exceeds max_len=8"], "payload": [""]})
    for _ in range(2):
        assert quarantine_pairs(lake, refused, stage="score", reason="over_length", run_id="r2") == 1
    q = lake.read("quarantine").row(0, named=True)
    assert lake.read("quarantine").height == 1
    assert (q["stage"], q["reason"], q["source"], q["shard"], q["source_row"]) == ("score", "over_length", "a", "a/x", 1)


def test_a_stated_preference_strength_is_carried_as_margin_and_never_guessed(lake, tmp_path):
    """UltraFeedback's rating gap and a TRL `margin` column land in raw_pairs.margin (the margin_bt loss reads it);
    a source that states none leaves it null."""
    uf = tmp_path / "uf.jsonl"
    uf.write_text(json.dumps({"instruction": "Name a colour.", "completions": [
        {"response": "Blue.", "overall_score": 9.0}, {"response": "A car.", "overall_score": 2.5},
        {"response": "Red!", "overall_score": 7.0}]}) + "\n")
    trl = tmp_path / "trl.jsonl"
    trl.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away.", "margin": 1.5}) + "\n"
                   + json.dumps({"prompt": "Yo?", "chosen": "Hey.", "rejected": "No."}) + "\n")
    ingest_shard(lake, str(uf), source="uf", shard="uf/a", run_id="r")
    ingest_shard(lake, str(trl), source="trl", shard="trl/a", run_id="r")
    raw = lake.read("raw_pairs")
    gaps = dict(zip(raw.filter(pl.col("source") == "uf")["chosen"] + "|" + raw.filter(pl.col("source") == "uf")["rejected"],
                    raw.filter(pl.col("source") == "uf")["margin"]))
    assert gaps == {"Blue.|A car.": 6.5, "Blue.|Red!": 2.0, "Red!|A car.": 4.5}
    t = dict(zip(raw.filter(pl.col("source") == "trl")["chosen"], raw.filter(pl.col("source") == "trl")["margin"]))
    assert t == {"Hello!": 1.5, "Hey.": None}


def test_jsonl_batches_keep_row_numbers_through_blank_indented_crlf_and_unterminated_lines(tmp_path):
    """The clean path cuts batches from bytes (no per-line Python); a blank, whitespace-only or indented line, a
    CRLF line, a stray CR inside a line and a last line without a newline must still give one row per line, with
    its own row number, and a blank line must be reported, never skipped."""
    from pipelines.ingest.readers import iter_jsonl, read_ahead

    lines = [json.dumps({"k": i}) for i in range(10)]
    lines[3] = ""  # blank
    lines[5] = "   "  # whitespace only
    lines[6] = ' {"k": 6}'  # valid JSON with a leading space
    lines[7] = '{"k": 7}\r'  # CRLF line ending
    lines[8] = '{"k": "a\rb"}'  # a stray CR inside a line (JSON allows none raw: undecodable, own row)
    path = tmp_path / "edge.jsonl"
    path.write_bytes("\n".join(lines).encode())  # no newline after the last line
    for batch_size, chunk in ((4, 1 << 26), (3, 16), (2, 5), (100, 1 << 26)):  # 5 B: lines outgrow the buffer
        rows = {}
        for b in read_ahead(iter_jsonl(str(path), batch_size=batch_size, chunk_bytes=chunk)):
            for r in b.as_records():
                rows[r.row] = r
        assert sorted(rows) == list(range(10)), (batch_size, chunk)
        assert rows[3].record is None and rows[5].record is None and rows[8].record is None
        assert [rows[i].record["k"] for i in (0, 1, 2, 4, 6, 7, 9)] == [0, 1, 2, 4, 6, 7, 9]


def test_persisted_id_index_is_reused_merged_geometrically_and_rebuilt_when_stale(lake, tmp_path):
    """IdStore: each committed shard adds a segment (merged with its elder when not much smaller), a reopened
    index answers like one built by a scan, and a write it did not see makes the next open rebuild it."""
    import numpy as np

    from pipelines.ingest.idstore import IdStore
    from pipelines.ingest.run import IdIndex, load_id_index

    store = IdStore(lake)
    index = store.open()
    assert len(index) == 0 and not store.rebuilt
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(120)]
    sizes = (40, 40, 10, 10)  # shards a..d
    at = 0
    for name, n in zip("abcd", sizes):
        rep = ingest_shard(lake, _write(tmp_path / f"{name}.jsonl", rows[at:at + n]), source="s", shard=f"s/{name}",
                           run_id="r", id_index=index)
        assert rep.kept == n
        store.commit(index, rep.version)
        at += n
        index = store.open()  # the next run
        assert not store.rebuilt and not index.chunks
    m = store.manifest()
    # 40 -> [40]; +40 -> [80]; +10 -> [80, 10]; +10 -> [80, 10, 10] -> [80, 20] (80 > 2 * 20: kept apart)
    assert [s["n"] for s in m["segments"]] == [80, 20] and m["version"] == lake.version("raw_pairs")
    assert isinstance(index.frozen[0][0], np.memmap)
    assert sorted(p.name for p in (tmp_path / "lake" / "_index" / "raw_pairs").iterdir()) == sorted(
        [s["name"] for s in m["segments"]] + ["manifest.json"])  # merged-away segments are deleted
    scanned = load_id_index(lake)
    ids = lake.read("raw_pairs")["pair_id"]
    hi, lo = IdIndex.split(ids)
    p1, r1 = index.lookup(hi, lo)
    p2, r2 = scanned.lookup(hi, lo)
    assert (r1 == r2).all() and (r1 >= 0).all()
    assert [index.places[c] for c in p1] == [scanned.places[c] for c in p2]
    # rerun of shard a on the persisted index: a no-op
    rep = ingest_shard(lake, str(tmp_path / "a.jsonl"), source="s", shard="s/a", run_id="r2", id_index=index)
    assert (rep.kept, rep.already_present) == (0, 40) and index.duplicate_keys() == 0

    lake.append("raw_pairs", lake.read("raw_pairs").head(1))  # behind ingest's back
    index = store.open()
    assert store.rebuilt and len(index) == 101 and index.duplicate_keys() == 1
    assert store.manifest()["version"] == lake.version("raw_pairs") and store.manifest()["duplicates"] == 1
    index = store.open()
    assert not store.rebuilt and index.duplicate_keys() == 1  # remembered, not recounted by a scan
