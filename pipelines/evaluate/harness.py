"""One evaluation harness for the paper's benchmark formats, on any reward model.

A benchmark table row is one item: history, one `chosen` (plus `chosen_more` when several answers are correct,
as in RewardBench 2 Ties), a list of `rejected` (1 = pairwise; 3 = RewardBench-2 best-of-4; N = PPE/RMB
best-of-N), a `section`, an optional `subset` (RM-Bench easy/normal/hard) and an optional `item_key`.
An item is correct when every correct response outscores every rejected one. Aggregation per benchmark:
- `sections` (RewardBench 1 and 2, JudgeBench, RM-Bench as the paper reports them): unweighted mean of sections;
- `pooled` (PPE, RMB, gold slices): accuracy over all items.
RewardBench 2's `Ties` section is not an accuracy: it is scored by `ties_score` (RewardBench 2's rule).
Every (history, response) is scored once with the same renderer as training (chat template, BOS, padding and
truncation rules are those of the model's tokenizer, pinned by `Renderer`).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from pipelines.rm.model import RewardModel
from pipelines.rm.score import score_texts

SECTION_MEAN = {"rewardbench", "rewardbench2", "judgebench", "rm-bench", "synth-bench"}

RESULT_SCHEMA = {"rm_version": pl.String, "benchmark": pl.String, "section": pl.String, "n": pl.Int64,
                 "accuracy": pl.Float64}


def score_items(rm: RewardModel, bench: pl.DataFrame, max_len: int = 256) -> pl.DataFrame:
    """Adds r_chosen (first correct answer), r_chosen_all and r_rejected (list[float]) and `correct`."""
    convs, owners = [], []
    more = bench["chosen_more"].to_list() if "chosen_more" in bench.columns else [None] * bench.height
    for i, (row, extra) in enumerate(zip(bench.iter_rows(named=True), more)):
        for resp, side in [(row["chosen"], 0), *((c, 0) for c in extra or [])] + [(r, 1) for r in row["rejected"]]:
            convs.append((row["history"], resp))
            owners.append((i, side))
    scores = score_texts(rm, convs, max_len=max_len)
    good: list[list[float]] = [[] for _ in range(bench.height)]
    bad: list[list[float]] = [[] for _ in range(bench.height)]
    for (i, side), s in zip(owners, scores):
        (bad if side else good)[i].append(s)
    return bench.with_columns(r_chosen=pl.Series([g[0] for g in good], dtype=pl.Float64),
                              r_chosen_all=pl.Series(good, dtype=pl.List(pl.Float64)),
                              r_rejected=pl.Series(bad, dtype=pl.List(pl.Float64))).with_columns(
        correct=pl.col("r_chosen_all").list.min() > pl.col("r_rejected").list.max())


def ties_score(items: pl.DataFrame) -> float:
    """RewardBench 2 `Ties`: items come in pairs keyed `ref:<id>` (one correct answer) and `tied:<id>` (several
    equally correct answers). Score = 0.3 ref accuracy + 0.3 tied accuracy + 0.2 P(correct-vs-wrong gap on the
    tied prompt > spread among its correct answers) + 0.2 the same with the gap min'd over ref and tied + 0.01
    mean tanh(gap / spread - 1). Accurate = worst correct > best wrong. Needs r_chosen_all, r_rejected, item_key."""
    stats: dict[tuple[str, str], tuple[bool, float | None, float]] = {}
    for key, good, bad in items.select("item_key", "r_chosen_all", "r_rejected").iter_rows():
        kind, _, pid = key.partition(":")
        gap = min(good) - max(bad)
        stats[(kind, pid)] = (gap > 0, max(good) - min(good) if len(good) > 1 else None, gap)
    ref = {pid: v for (kind, pid), v in stats.items() if kind == "ref"}
    tied = {pid: v for (kind, pid), v in stats.items() if kind == "tied"}
    if not ref and not tied:
        raise ValueError("Ties items need item_key 'ref:<id>' or 'tied:<id>'")
    ref_acc = float(np.mean([v[0] for v in ref.values()])) if ref else 0.0
    tied_acc = float(np.mean([v[0] for v in tied.values()])) if tied else 0.0
    both = sorted(set(ref) & set(tied))
    if not both:
        return 0.3 * ref_acc + 0.3 * tied_acc
    spread = np.array([tied[p][1] if tied[p][1] is not None else 0.0 for p in both])
    gap_tied = np.array([tied[p][2] for p in both])
    gap_hard = np.minimum(gap_tied, np.array([ref[p][2] for p in both]))
    with np.errstate(divide="ignore", invalid="ignore"):
        margin = np.nan_to_num(np.tanh(gap_hard / spread - 1), nan=0.0)
    return float(0.3 * tied_acc + 0.3 * ref_acc + 0.2 * np.mean(gap_tied > spread) + 0.2 * np.mean(gap_hard > spread)
                 + 0.01 * np.mean(margin))


def _section_scores(g: pl.DataFrame) -> pl.DataFrame:
    per = g.group_by("section").agg(n=pl.len(), accuracy=pl.col("correct").mean()).sort("section")
    if g["benchmark"][0] == "rewardbench" and "math-prm" in g["subset"].to_list():
        # RewardBench 1 weighs its sections' subsets by size, but counts math-prm as large as all code subsets
        # together (its EXAMPLE_COUNTS): Reasoning = mean(math accuracy, pooled code accuracy).
        r = g.filter(pl.col("section") == "Reasoning")
        math_acc = r.filter(pl.col("subset") == "math-prm")["correct"].mean()
        code = r.filter(pl.col("subset") != "math-prm")["correct"]
        reasoning = (math_acc + code.mean()) / 2 if code.len() else math_acc
        per = per.with_columns(accuracy=pl.when(pl.col("section") == "Reasoning").then(reasoning)
                               .otherwise("accuracy"))
    ties = [s for s in per["section"] if s.lower() == "ties"]
    if ties and "item_key" in g.columns:  # ties_score refuses items without ref:/tied: keys
        t = ties_score(g.filter(pl.col("section") == ties[0]))
        per = per.with_columns(accuracy=pl.when(pl.col("section") == ties[0]).then(t).otherwise("accuracy"))
    return per


def aggregate(scored: pl.DataFrame, rm_version: str) -> pl.DataFrame:
    """Per section, per subset (as section 'subset:<name>'), and overall rows for every benchmark in `scored`."""
    out = []
    for (bench,), g in scored.group_by("benchmark", maintain_order=True):
        per = _section_scores(g)
        out.append(per.select(pl.lit(rm_version).alias("rm_version"), pl.lit(bench).alias("benchmark"), "section",
                              pl.col("n").cast(pl.Int64), "accuracy"))
        subs = g.filter(pl.col("subset") != "")
        if subs.height:
            s = subs.group_by("subset").agg(n=pl.len(), accuracy=pl.col("correct").mean()).sort("subset")
            out.append(s.select(pl.lit(rm_version).alias("rm_version"), pl.lit(bench).alias("benchmark"),
                                ("subset:" + pl.col("subset")).alias("section"), pl.col("n").cast(pl.Int64),
                                "accuracy"))
        overall = float(per["accuracy"].mean()) if bench in SECTION_MEAN else float(g["correct"].mean())
        out.append(pl.DataFrame({"rm_version": [rm_version], "benchmark": [bench], "section": ["overall"],
                                 "n": [g.height], "accuracy": [overall]}, schema=RESULT_SCHEMA))
    return pl.concat([o.cast(RESULT_SCHEMA) for o in out]) if out else pl.DataFrame(schema=RESULT_SCHEMA)


def evaluate(rm: RewardModel, bench: pl.DataFrame, rm_version: str, max_len: int = 256) -> tuple[pl.DataFrame, pl.DataFrame]:
    scored = score_items(rm, bench, max_len)
    return aggregate(scored, rm_version), scored


def pairwise_accuracy(scores: pl.DataFrame, by: str | None = None) -> pl.DataFrame:
    """Accuracy of an rm_scores frame (margin > 0), overall or per `by` column."""
    agg = [pl.len().alias("n"), (pl.col("margin") > 0).mean().alias("accuracy")]
    return scores.group_by(by).agg(agg).sort(by) if by else scores.select(agg)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for an accuracy (used to say 'above chance' honestly)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return centre - half, centre + half


def table1(results: pl.DataFrame) -> pl.DataFrame:
    """Paper Table-1 shape: one row per RM, one column per benchmark (overall), plus their unweighted average."""
    ov = results.filter(pl.col("section") == "overall")
    wide = ov.pivot(on="benchmark", index="rm_version", values="accuracy").sort("rm_version")
    cols = [c for c in wide.columns if c != "rm_version"]
    return wide.with_columns(average=pl.mean_horizontal(cols)) if cols else wide
