"""`synpref evaluate` vs the `transformers` text-classification pipeline on the same benchmark items (issue 21).

Ours: `pipelines.evaluate.run.evaluate_external` — what `synpref evaluate --model DIR` runs after parsing its
arguments: read the published-layout files, load the RM, score every distinct (history, response) once in
length-sorted batches, aggregate with the authors' formulas, write `rm_evaluation` / `rm_item_rewards` (Delta) and
lineage. All of that is timed.

Peer (named): the authors' own loops, each fed the texts its script scores, through the `transformers`
pipeline("text-classification", function_to_apply="none") they use, batched in file order: RM-Bench's
`scripts/run_rm.py` scores per style i the pair (chosen[i], rejected[i]) — 6 texts a row, its 3x3 matrix built
from those; reward-bench's `run_v2.py` every completion once — 4 texts a RewardBench 2 row; JudgeBench's
`run_judge.py --single_game` (its README's reward-model command) A and B — 2 texts a pair. The peer is handed the
items already parsed and its pipeline is built outside the timer: only its scoring is timed (in its favour).

Items: three published layouts built from real hh-rlhf pairs (../shared; project-made pairs when absent):
RM-Bench rows (3 chosen x 3 rejected styles: the response shortened, as is, under a markdown header = 9 items a
row), RewardBench 2 rows (1 chosen, 3 rejected: the rejected response and two other rows' rejected answers) and
JudgeBench pairs. Both sides must give the same reward to every text neither side cut.

    python benchmarks/evaluate_vs_pipeline.py --rows 120 --model minilm
    python benchmarks/evaluate_vs_pipeline.py --rows 120 --model decoder
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def published_files(folder: Path, n: int) -> None:
    """RM-Bench, RewardBench 2 and JudgeBench files in their published layouts (every column they ship)."""
    from benchmarks.rm_train import load_rows

    rows, _, _ = load_rows(3 * n, 1)
    a, b, c = rows[:n], rows[n:2 * n], rows[2 * n:3 * n]

    def styles(text: str) -> list[str]:
        words = text.split()
        return [" ".join(words[: max(4, len(words) // 3)]), text, "## Answer\n\n" + text]

    (folder / "rm-bench").mkdir(parents=True)
    (folder / "rm-bench" / "chat_filtered.json").write_text(json.dumps([
        {"id": i, "subset": "alpacaeval", "prompt": r["history"][-1]["content"], "chosen": styles(r["chosen"]),
         "rejected": styles(r["rejected"]), "error_key": "", "error": ""}
        for i, r in enumerate(a)]))
    (folder / "rewardbench2").mkdir()
    with open(folder / "rewardbench2" / "test-00000-of-00001.jsonl", "w") as f:
        for i, r in enumerate(b):
            others = [b[(i + k) % len(b)]["rejected"] for k in (1, 2)]
            f.write(json.dumps({"id": str(i), "prompt": r["history"][-1]["content"], "chosen": [r["chosen"]],
                                "rejected": [r["rejected"], *others], "num_correct": 1, "num_incorrect": 3,
                                "total_completions": 4, "models": ["hh"] * 4,
                                "subset": ["Focus", "Precise IF", "Safety"][i % 3]}) + "\n")
    (folder / "judgebench").mkdir()
    sources = ["mmlu-pro-law", "livebench-reasoning", "livebench-math", "livecodebench"]
    with open(folder / "judgebench" / "gpt-00000-of-00001.jsonl", "w") as f:
        for i, r in enumerate(c):
            ab = (r["chosen"], r["rejected"]) if i % 2 == 0 else (r["rejected"], r["chosen"])
            f.write(json.dumps({"pair_id": f"jb-{i}", "original_id": str(i), "source": sources[i % 4],
                                "question": r["history"][-1]["content"], "response_model": "hh",
                                "response_A": ab[0], "response_B": ab[1],
                                "label": "A>B" if i % 2 == 0 else "B>A"}) + "\n")


def make_model(kind: str, out: Path) -> str:
    """A sequence-classification folder both sides load: MiniLM (pretrained encoder, its score head saved once so
    both see the same weights) or a Qwen3-shaped decoder with a chat template (random init, 4 layers x 256)."""
    from pipelines.rm.model import load_reward_model, save_reward_model
    from pipelines.rm.tiny import build_tiny_decoder
    from pipelines.settings import minilm_path

    if kind == "decoder":
        return build_tiny_decoder(out, "qwen3", seed=0, hidden=256, layers=4)
    save_reward_model(load_reward_model(minilm_path(), seed=0), str(out))
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=120, help="rows per benchmark file")
    ap.add_argument("--model", choices=["minilm", "decoder"], default="minilm")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    import numpy as np
    import polars as pl
    import torch
    from transformers import pipeline

    from pipelines.compute import InProcessEngine
    from pipelines.evaluate.run import evaluate_external, evaluation_items
    from pipelines.lake import Lake
    from pipelines.rm.model import load_reward_model
    from pipelines.schema import prompt_text

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        published_files(work / "benchmarks", a.rows)
        model = make_model(a.model, work / "rm")
        lake = Lake(str(work / "lake"))
        engine = InProcessEngine(max_len=a.max_len, batch_size=a.batch)
        t, c = time.perf_counter(), time.process_time()
        ev, version = evaluate_external(lake, model, engine, benchmarks_dir=work / "benchmarks",
                                        max_len_cap=a.max_len, run_id="bench")
        t_ours, c_ours = time.perf_counter() - t, time.process_time() - c
        n_items = int(ev.results.filter(pl.col("section") == "overall")["n"].sum())

        # the peer: the authors' loops over the same items, as parsed: RM-Bench's run_rm.py scores the diagonal
        # cells' texts (style i chosen vs style i rejected) and builds the matrix from them; the others score
        # every item's own texts
        items = evaluation_items(Lake(str(work / "empty")), work / "benchmarks")
        authors = items.filter((pl.col("benchmark") != "rm-bench")
                               | (pl.col("item_key").str.slice(-2, 1) == pl.col("item_key").str.slice(-1, 1)))
        rm = load_reward_model(model)
        rm.model.eval()
        keys, inputs = [], []
        for bench, key, hist, chosen, rejected in authors.select("benchmark", "item_key", "history", "chosen",
                                                                 "rejected").iter_rows():
            for role, resps in (("chosen", chosen), ("rejected", rejected)):
                for idx, resp in enumerate(resps):
                    keys.append((bench, key, role, idx))
                    if rm.is_decoder:
                        # the template writes the BOS and the pipeline's tokenizer adds one: drop the rendered one,
                        # as the Skywork-Reward-V2 model card warns (a second BOS changes the reward)
                        text = rm.tokenizer.apply_chat_template([*hist, {"role": "assistant", "content": resp}],
                                                                tokenize=False)
                        bos = rm.tokenizer.bos_token
                        inputs.append(text[len(bos):] if bos and text.startswith(bos) else text)
                    else:
                        inputs.append({"text": prompt_text(hist), "text_pair": resp})
        pipe = pipeline("text-classification", model=rm.model, tokenizer=rm.tokenizer, device=-1,
                        function_to_apply="none", top_k=None)
        # longest_first: "only_first" raises when a response alone is over the limit (differences are compared on
        # texts neither side cut, so how the peer cuts does not enter the comparison)
        kw = {"truncation": True, "max_length": a.max_len}
        pipe(inputs[:a.batch], batch_size=a.batch, **kw)  # warm-up
        t, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = pipe(inputs, batch_size=a.batch, **kw)
        t_peer, c_peer = time.perf_counter() - t, time.process_time() - c
        peer = pl.DataFrame({"benchmark": [k[0] for k in keys], "item_key": [k[1] for k in keys],
                             "role": [k[2] for k in keys], "idx": [k[3] for k in keys],
                             "peer": [float((o[0] if isinstance(o, list) else o)["score"]) for o in out]})
        both = ev.rewards.join(peer, on=["benchmark", "item_key", "role", "idx"], how="inner").filter(
            pl.col("truncated") == "none")
        diff = float(np.abs(both["reward"].to_numpy() - both["peer"].to_numpy()).max()) if both.height else float("nan")
        per_bench = ev.results.filter(pl.col("section") == "overall").select("benchmark", "n", "score")
        print(f"{a.model}, max_len {a.max_len}, batch {a.batch}, torch threads {torch.get_num_threads()}; "
              f"{n_items} items ({', '.join(f'{b} {n}' for b, n, _ in per_bench.iter_rows())}), "
              f"{len(inputs)} texts for the peer, {ev.rewards['item_key'].n_unique()} keys")
        per_text = {b: n for b, n in authors.with_columns(t=pl.col("chosen").list.len() + pl.col("rejected")
                                                           .list.len()).group_by("benchmark").agg(
            pl.col("t").sum()).iter_rows()}
        print(f"authors' loops' texts: {per_text} (rm-bench {per_text.get('rm-bench', 0) / a.rows:.0f} a row)")
        print(f"synpref evaluate (read + load + score + aggregate + Delta write): {n_items / t_ours:,.1f} items/s "
              f"({t_ours:.1f} s) | authors' loops, transformers pipeline (scoring only): "
              f"{n_items / t_peer:,.1f} items/s "
              f"({t_peer:.1f} s) | ratio {t_peer / t_ours:.2f}x (goal >= 3x) | max |reward difference| on "
              f"{both.height} uncut texts {diff:.2e}")
        # CPU seconds (this process, all threads): what each side costs when the box is shared and wall time is not
        print(f"CPU seconds: ours {c_ours:.1f} ({n_items / c_ours:,.1f} items per CPU-s) | authors' loops "
              f"{c_peer:.1f} ({n_items / c_peer:,.1f} items per CPU-s) | ratio {c_peer / c_ours:.2f}x; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
