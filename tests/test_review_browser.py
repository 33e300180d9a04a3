"""A real headless Chromium signs in to the review app, labels three pairs with the keyboard, and the verdicts
are read back from the Delta ledger. A screenshot is saved to test-artifacts/."""

import shutil
from pathlib import Path

import polars as pl
import pytest

from pipelines.review.ledger import read_verdicts
from pipelines.review.queue import QUEUE, build_queue

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.integration
def test_annotator_labels_three_pairs_with_the_keyboard(lake, tmp_path, serve_review):
    if CHROMIUM is None:
        pytest.fail("Debian chromium is missing: .ci/run installs it (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the [test] extra")
    from pipelines.review.app import add_annotator

    n = 4
    pairs = pl.DataFrame({"pair_id": [f"p{i}" for i in range(n)],
                          "history": [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(n)],
                          "chosen": [f"It is {i + 1}." for i in range(n)], "rejected": [f"It is {i + 7}." for i in range(n)],
                          "source": ["s"] * n, "shard": ["s/x"] * n, "source_row": list(range(n))})
    lake.overwrite("raw_pairs", pairs)
    lake.overwrite(QUEUE, build_queue(pl.DataFrame({"pair_id": pairs["pair_id"], "task_category": ["math"] * n,
                                                    "objectivity": ["objective"] * n, "controversiality": ["low"] * n}),
                                      size=n, queue_version="v1", overlap_frac=0.0))
    ann = tmp_path / "annotators.json"
    token = add_annotator(ann, "alice")
    url = serve_review(lake.root, ann)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        assert page.goto(url + "/").status == 401  # not signed in
        page.fill("input[name=token]", token)
        page.click("button[type=submit]")
        page.wait_for_selector("#cand1")
        shots = ROOT / "test-artifacts"
        shots.mkdir(exist_ok=True)
        page.screenshot(path=str(shots / "review-app.png"), full_page=True)
        picked = []
        for _ in range(3):
            c1 = page.inner_text("#cand1")
            want = "1" if any(f"It is {i + 1}." in c1 for i in range(n)) else "2"  # pick the correct sum
            pid = page.get_attribute("input[name=pair_id]", "value")
            with page.expect_navigation():
                page.keyboard.press(want)
            picked.append(pid)
        assert "Progress: 3 verdicts" in page.content()
        browser.close()
    v = read_verdicts(lake)
    assert sorted(v["pair_id"].to_list()) == sorted(picked) and v.height == 3
    assert (v["prefers"] == "chosen").all() and (v["annotator"] == "alice").all()
    assert (v["seconds_spent"] >= 0).all()


@pytest.mark.integration
def test_two_annotators_at_once_a_closed_tab_and_agreement_in_chromium(lake, tmp_path, serve_review):
    """Two signed-in browser sessions side by side never see the same pair unless it is a double-annotated one; a
    tab closed mid-item loses nothing (its lease runs out, the pair goes to the next annotator); the lead sees the
    agreement on the double-annotated pair."""
    if CHROMIUM is None:
        pytest.fail("Debian chromium is missing: .ci/run installs it (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the [test] extra")
    from pipelines.review.app import add_annotator
    from tests.test_review import Clock, _queue

    lake.overwrite(QUEUE, _queue(8, overlap={0}))
    ann = tmp_path / "annotators.json"
    tokens = {n: add_annotator(ann, n, "lead" if n == "lena" else "annotator") for n in ("alice", "bob", "carol",
                                                                                        "dave", "lena")}
    clock = Clock()
    url = serve_review(lake.root, ann, lease_ttl_s=60, clock=clock)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])

        def session(name):
            ctx = browser.new_context()  # its own cookie jar: one annotator per context
            page = ctx.new_page()
            page.goto(url + "/login")
            page.fill("input[name=token]", tokens[name])
            page.click("button[type=submit]")
            page.wait_for_selector("#progress")
            return ctx, page

        def shown(page):
            return page.get_attribute("input[name=pair_id]", "value")

        (_, alice), (_, bob) = session("alice"), session("bob")
        seen = []
        for _ in range(3):  # both hold a pair at the same time, then both label it
            a, b = shown(alice), shown(bob)
            seen.append((a, b))
            assert a != b or a == "p0", f"both sessions were shown {a}"
            for page in (alice, bob):
                want = "1" if page.inner_text("#cand1").startswith("Candidate 1\nA") else "2"  # A* is chosen
                with page.expect_navigation():
                    page.keyboard.press(want)
        assert seen[0] == ("p0", "p0")  # the double-annotated pair goes to both
        held = {x for pair in seen for x in pair}
        # carol opens a pair and closes the tab without a verdict
        carol_ctx, carol = session("carol")
        abandoned = shown(carol)
        assert abandoned not in held
        carol_ctx.close()
        assert abandoned not in set(read_verdicts(lake)["pair_id"])
        clock.t += 40
        # alice's and bob's open pages keep their pairs (the page's heartbeat, called now rather than on its timer)
        assert alice.evaluate("heartbeat()") == 200 and bob.evaluate("heartbeat()") == 200
        clock.t += 21  # carol's lease has run out: her closed tab sent no heartbeat
        _, dave = session("dave")
        assert shown(dave) == abandoned  # the abandoned pair is back in the queue and served again
        alice.reload()
        assert shown(alice) not in (abandoned, shown(dave), shown(bob))  # alice kept hers
        assert "Progress: 3 verdicts" in alice.content()
        _, lead = session("lena")
        lead.goto(url + "/lead")
        row = lead.inner_text("#agreement-batch")
        assert "q001" in row and "1.00" in row  # both chose the chosen response on p0: full agreement
        assert "alice" in lead.inner_text("#progress") and "bob" in lead.inner_text("#progress")
        shots = ROOT / "test-artifacts"
        shots.mkdir(exist_ok=True)
        lead.screenshot(path=str(shots / "review-lead.png"), full_page=True)
        browser.close()
    v = read_verdicts(lake)
    assert v.height == 6 and v.select("pair_id", "annotator").is_duplicated().sum() == 0
    assert (v["prefers"] == "chosen").all()
