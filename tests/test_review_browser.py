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
