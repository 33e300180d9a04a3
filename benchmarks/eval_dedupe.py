"""Evaluation throughput on RM-Bench's layout: every distinct (history, response) scored once (the harness:
`pipelines.evaluate.harness.score_items` through the in-process engine) vs per-item scoring (the peer: each item's
chosen and rejected scored as that item's own texts, what the harness did before), same model, same run.

RM-Bench rows carry 3 chosen and 3 rejected styles and become 9 pairwise items, so per-item scoring scores each
response 3 times. Data: hh-rlhf prompts and responses shaped into RM-Bench rows (styles = the response, shortened,
and with a markdown header), or project-made pairs when ../shared is absent.

    python benchmarks/eval_dedupe.py --rows 120
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rm_bench_rows(n: int) -> list[dict]:
    from benchmarks.rm_train import load_rows

    rows, _, _ = load_rows(n, 1)

    def styles(text: str) -> list[str]:
        words = text.split()
        return [" ".join(words[: max(4, len(words) // 3)]), text, "## Answer\n\n" + text]

    return [{"id": i, "prompt": r["history"][-1]["content"], "chosen": styles(r["chosen"]),
             "rejected": styles(r["rejected"]), "domain": "chat"} for i, r in enumerate(rows[:n])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=120)
    ap.add_argument("--max-len", type=int, default=256)
    a = ap.parse_args()
    import json
    import tempfile

    import polars as pl

    from pipelines.compute import InProcessEngine
    from pipelines.evaluate.benchmarks import read_benchmark_dir
    from pipelines.evaluate.harness import aggregate, score_items
    from pipelines.rm.model import load_reward_model
    from pipelines.rm.registry import ModelRef
    from pipelines.rm.score import score_texts
    from pipelines.settings import minilm_path

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "rm-bench"
        folder.mkdir()
        (folder / "chat_bench.json").write_text(json.dumps(rm_bench_rows(a.rows)))
        items = pl.DataFrame(read_benchmark_dir(folder)[0])
    ref = ModelRef("minilm:0", minilm_path(), "", "")
    engine = InProcessEngine(max_len=a.max_len)
    engine._model(ref)  # load outside the timed region, for both sides
    rm = load_reward_model(minilm_path())
    t = time.perf_counter()
    scored, _ = score_items(items, lambda texts: engine.score_texts(texts, {"m": (ref, a.max_len)})["m"])
    ours = time.perf_counter() - t
    t = time.perf_counter()
    per_item = [(score_texts(rm, [(h, c) for c in ch], max_len=a.max_len), score_texts(rm, [(h, r) for r in rj],
                                                                                   max_len=a.max_len))
                for h, ch, rj in items.select("history", "chosen", "rejected").iter_rows()]
    peer = time.perf_counter() - t
    same = all(abs(x - y) < 1e-4 for (pc, pr), oc, orj in zip(per_item, scored["r_chosen"], scored["r_rejected"])
               for x, y in zip(pc + pr, list(oc) + list(orj)))
    score = aggregate(scored, "minilm:0").filter(pl.col("section") == "overall")["score"][0]
    print(f"RM-Bench layout, {a.rows} rows = {items.height} items, MiniLM, max_len {a.max_len}: distinct-text "
          f"scoring {items.height / ours:,.1f} items/s vs per-item {items.height / peer:,.1f} items/s = "
          f"{peer / ours:.2f}x; rewards equal: {same}; RM-Bench score {score:.3f}")


if __name__ == "__main__":
    main()
