"""One evaluation harness for the paper's benchmark formats, on any reward model.

A benchmark table row is one item: history, one `chosen`, a list of `rejected` (1 = pairwise; 3 = RewardBench-2
best-of-4; N = PPE/RMB best-of-N), a `section` and an optional `subset` (RM-Bench easy/normal/hard).
An item is correct when the chosen response outscores every rejected one. Aggregation per benchmark:
- `sections` (RewardBench 1, JudgeBench as the paper reports it): unweighted mean of section accuracies;
- `pooled` (PPE, RMB, gold slices): accuracy over all items.
Every (history, response) is scored once with the same renderer as training (chat template, BOS, padding and
truncation rules are those of the model's tokenizer, pinned by `Renderer`).
"""

from __future__ import annotations

import polars as pl

from pipelines.rm.model import RewardModel
from pipelines.rm.score import score_texts

SECTION_MEAN = {"rewardbench", "rewardbench2", "judgebench", "rm-bench", "synth-bench"}

RESULT_SCHEMA = {"rm_version": pl.String, "benchmark": pl.String, "section": pl.String, "n": pl.Int64,
                 "accuracy": pl.Float64}


def score_items(rm: RewardModel, bench: pl.DataFrame, max_len: int = 256) -> pl.DataFrame:
    """Adds r_chosen (float) and r_rejected (list[float]) and `correct` to each benchmark item."""
    convs, owners = [], []
    for i, row in enumerate(bench.iter_rows(named=True)):
        convs.append((row["history"], row["chosen"]))
        owners.append((i, -1))
        for j, rej in enumerate(row["rejected"]):
            convs.append((row["history"], rej))
            owners.append((i, j))
    scores = score_texts(rm, convs, max_len=max_len)
    rc = [0.0] * bench.height
    rr: list[list[float]] = [[] for _ in range(bench.height)]
    for (i, j), s in zip(owners, scores):
        if j < 0:
            rc[i] = s
        else:
            rr[i].append(s)
    return bench.with_columns(r_chosen=pl.Series(rc), r_rejected=pl.Series(rr, dtype=pl.List(pl.Float64))).with_columns(
        correct=pl.col("r_chosen") > pl.col("r_rejected").list.max())


def aggregate(scored: pl.DataFrame, rm_version: str) -> pl.DataFrame:
    """Per section, per subset (as section 'subset:<name>'), and overall rows for every benchmark in `scored`."""
    out = []
    for (bench,), g in scored.group_by("benchmark", maintain_order=True):
        per = g.group_by("section").agg(n=pl.len(), accuracy=pl.col("correct").mean()).sort("section")
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
