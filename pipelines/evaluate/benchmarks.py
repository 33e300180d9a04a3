"""Benchmark files -> benchmark items (the rows `pipelines.evaluate.harness` scores).

One reader for the paper's formats: pairwise (TRL/JudgeBench/hh/RewardBench 1), best-of-N (`rejected` a list:
RewardBench 2, PPE, RMB), several correct answers (`chosen` a list: RewardBench 2 Ties) and RM-Bench's 3x3 style
matrix. `section` and `subset` are kept for the harness' aggregation.
"""

from __future__ import annotations

import pyarrow as pa

from pipelines.ingest.formats import PARSERS, ParseStats, detect_format
from pipelines.ingest.readers import iter_records
from pipelines.schema import MESSAGE_TYPE

BENCHMARK_SCHEMA = pa.schema([
    ("benchmark", pa.string()), ("item_id", pa.int64()), ("section", pa.string()), ("subset", pa.string()),
    ("history", pa.list_(MESSAGE_TYPE)), ("chosen", pa.string()), ("rejected", pa.list_(pa.string())),
    ("chosen_more", pa.list_(pa.string())), ("item_key", pa.string()),
])


# RewardBench 1 publishes a `subset` per row; its four reported sections group them (rewardbench's constants).
RB1_SECTIONS = {
    **dict.fromkeys(["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
                    "Chat"),
    **dict.fromkeys(["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                     "llmbar-adver-GPTOut", "llmbar-adver-manual"], "Chat Hard"),
    **dict.fromkeys(["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
                     "donotanswer"], "Safety"),
    **dict.fromkeys(["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"], "Reasoning"),
}


def read_benchmark(path: str, name: str) -> list[dict]:
    """Benchmark rows: pairwise (TRL/JudgeBench/hh) or best-of-N (`rejected` a list; RewardBench 2 also has
    `chosen` a list for Ties, where several answers are correct). Keeps `section`/`subset` and `id`."""
    out, item = [], 0
    for batch in iter_records(path):
        for rec in batch:
            if rec.record is None:
                raise ValueError(f"{path} row {rec.row}: {rec.error}")
            r = rec.record
            chosen, rejected = r.get("chosen"), r.get("rejected")
            many_chosen = isinstance(chosen, list) and chosen and all(isinstance(x, str) for x in chosen)
            many = isinstance(rejected, list) and rejected and all(isinstance(x, str) for x in rejected)
            probe = dict(r, rejected=rejected[0] if many else rejected, chosen=chosen[0] if many_chosen else chosen)
            fmt = detect_format(probe)
            cand = PARSERS[fmt](probe, ParseStats())[0]
            if many_chosen and many and name.replace("-", "").lower().startswith("rmbench"):
                out += rm_bench_items(name, item, r, cand.history, chosen, rejected)
                item += len(chosen) * len(rejected)
                continue
            section, subset = r.get("section"), r.get("subset")
            if not section and name == "rewardbench" and subset in RB1_SECTIONS:
                section = RB1_SECTIONS[subset]  # keep the subset: sections are weighted over their subsets
            elif not section:
                section, subset = subset, None
            out.append({"benchmark": name, "item_id": item, "section": str(section or "all"),
                        "subset": str(r.get("difficulty") or subset or ""),
                        "history": cand.history, "chosen": cand.chosen,
                        "rejected": list(rejected) if many else [cand.rejected],
                        "chosen_more": list(chosen[1:]) if many_chosen else [],
                        "item_key": str(r.get("id", item))})
            item += 1
    return out


def rm_bench_items(name: str, item: int, r: dict, history: list, chosen: list[str], rejected: list[str]) -> list[dict]:
    """RM-Bench rows carry 3 chosen and 3 rejected styles (concise, detailed, detailed+markdown). Every
    (chosen i, rejected j) is one pairwise item: i == j is `normal`, i > j (chosen more styled) `easy`, i < j
    `hard` — RM-Bench's accuracy matrix, whose three triangles are its easy/normal/hard scores."""
    section = str(r.get("domain") or r.get("section") or "all")
    return [{"benchmark": name, "item_id": item + k, "section": section,
             "subset": "normal" if i == j else ("easy" if i > j else "hard"), "history": history,
             "chosen": c, "rejected": [rj], "chosen_more": [], "item_key": f"{r.get('id', item)}:{i}{j}"}
            for k, (i, j) in enumerate((i, j) for i in range(len(chosen)) for j in range(len(rejected)))
            for c, rj in [(chosen[i], rejected[j])]]
