"""The evaluation harness: score every distinct (history, response) once per model, then each benchmark's score
as its authors' scripts compute it.

Scoring: the items of every benchmark are exploded into their responses; a response is keyed by a hash of
(history, response), so one shared by several items (RM-Bench's 3x3 cells reuse each response three times, RewardBench 2
repeats prompts across subsets) is scored once, in one batched pass over every benchmark, by the same engine as
Stage 2 (in-process or Ray actors). Each scored text records its token count and how it was cut (none | history |
response, see `Renderer.encode_for_eval`): the report counts items scored whole and truncated per model, benchmark
and section.

Scores (the spec is the authors' code; see README "Evaluation"):
- rewardbench (allenai/reward-bench): per subset, chosen > rejected; a section = its subsets weighted by the script's
  EXAMPLE_COUNTS (math-prm 984 = all code subsets); overall = mean of Chat, Chat Hard, Safety, Reasoning.
- rewardbench2 (reward-bench v2 `reroll_and_score_dataset`): a row's scores are every completion, chosen then
  rejected; it scores 1/k when the first ties k-1 others at the maximum, 1 when it is the unique maximum, else 0;
  Ties by `process_single_model` (`ties_score`: NaN when no prompt is in both its ref and tied sets, as there);
  overall = mean of the six subsets.
- rm-bench (THU-KEG/RM-Bench `compute_accuracy`): per domain a 3x3 matrix acc[i][j] = P(chosen style i > rejected
  style j); hard = mean of i<j, normal = the diagonal, easy = i>j; safety-refuse and safety-response are one safety
  domain; a domain = mean(easy, normal, hard); overall = mean of the domains.
- judgebench (ScalerLab/JudgeBench `compute_final_metrics`, reward-model judges in `utils/judges.py`): each pair is
  judged in both orders (run_judge.py's default; the authors' published reward-model outputs carry both games), a
  game's decision 'A>B' if its first score is higher else 'B>A', the second game flipped back; a pair is right when
  the votes net positive. A reward model's two games agree unless the rewards tie, and a tie nets zero (a tie, not
  right): right iff reward(correct) > reward(other); per
  category (knowledge = mmlu-pro-*, reasoning, math, coding) accuracy; overall = the unweighted mean of the four (as
  the SynPref paper's Table 1 reports it); `overall_official` = the pooled accuracy the official script prints.
  Both per response-model set (`<model>/...`) and pooled (`pooled`, `pooled_official`); `overall` is the GPT-4o
  set's, the one the leaderboard reports, when it is there.
- ppe-preference: accuracy on the human vote, pooled over every vote with a winner (PPE's accuracy; the per-language
  rows are shown, not averaged); ppe-correctness: one item per (correct, incorrect) pair PPE samples for a row
  (`sampled_conflict_pairs`), correct when the correct response's reward is strictly higher, pooled per source
  benchmark, overall = mean of the sources.
- rmb: pairwise accuracy and best-of-N (best beats every loser) per goal; overall = mean of its sections.
- synth-bench and gold_test (in-distribution): accuracy per section / pooled.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import polars as pl

from pipelines.evaluate.benchmarks import JUDGEBENCH_LEADERBOARD_SET, RB1_EXAMPLE_COUNTS, RB1_SECTIONS

RESULT_SCHEMA = {"rm_version": pl.String, "benchmark": pl.String, "section": pl.String, "n": pl.Int64,
                 "score": pl.Float64, "truncated": pl.Int64, "max_len": pl.Int64}
REWARD_SCHEMA = {"rm_version": pl.String, "benchmark": pl.String, "item_key": pl.String, "role": pl.String,
                 "idx": pl.Int64, "reward": pl.Float64, "tokens": pl.Int64, "truncated": pl.String}


def text_key_expr() -> pl.Expr:
    """A stable key of (history, response): the same conversation gets one score however many items hold it."""
    hist = pl.col("history").list.eval(pl.element().struct.field("role") + "\x1f"
                                       + pl.element().struct.field("content")).list.join("\x1e")
    return pl.concat_str([hist.fill_null(""), pl.col("response")], separator="\x1d").hash(seed=17).cast(pl.String)


def responses(items: pl.DataFrame) -> pl.DataFrame:
    """One row per (item, response): benchmark, item_id, item_key, role (chosen | rejected), idx, history, response,
    text_key."""
    parts = []
    for role in ("chosen", "rejected"):
        parts.append(items.select("benchmark", "item_id", "item_key", "history", role)
                     .with_columns(idx=pl.int_ranges(pl.col(role).list.len()))
                     .explode(role, "idx").rename({role: "response"}).with_columns(role=pl.lit(role)))
    out = pl.concat(parts).with_columns(idx=pl.col("idx").cast(pl.Int64))
    return out.with_columns(text_key=text_key_expr())


def score_items(items: pl.DataFrame, score_texts: Callable[[pl.DataFrame], pl.DataFrame],
                resp: pl.DataFrame | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Rewards for every item. `score_texts(unique texts: text_key, history, response) -> text_key, reward, tokens,
    truncated` is called once with each distinct text. Returns (items with r_chosen/r_rejected lists and
    `truncated` (any of its texts cut), per-response rows). `resp` = `responses(items)` when already computed."""
    resp = responses(items) if resp is None else resp
    unique = resp.unique("text_key", keep="first").select("text_key", "history", "response")
    scored = score_texts(unique)
    resp = resp.join(scored, on="text_key", how="left").sort("benchmark", "item_id", "role", "idx")
    agg = (resp.group_by("benchmark", "item_id", maintain_order=True).agg(
        r_chosen=pl.col("reward").filter(pl.col("role") == "chosen"),
        r_rejected=pl.col("reward").filter(pl.col("role") == "rejected"),
        truncated=(pl.col("truncated") != "none").any()))
    return items.join(agg, on=["benchmark", "item_id"], how="left"), resp


def credit(bench: str, good: list[float], bad: list[float], subset: str = "") -> float:
    """One item's credit under its benchmark's rule (see the module docstring)."""
    if bench == "rewardbench2":  # reroll_and_score_dataset: every completion (chosen + rejected) is in `scores`
        scores = np.array([*good, *bad])
        top = scores.max()
        return float(1.0 / np.sum(scores == top)) if scores[0] == top else 0.0
    if bench == "ppe-correctness":
        return float(np.mean([g > b for g in good for b in bad]))
    return float(min(good) > max(bad))


def ties_score(items: pl.DataFrame) -> float:
    """RewardBench 2 `Ties` (reward-bench `process_single_model`): items come in pairs keyed `ref:<id>` (one correct
    answer) and `tied:<id>` (several equally correct answers). Score = 0.3 tied accuracy + 0.3 ref accuracy + 0.2
    P(correct-vs-wrong gap on the tied prompt > spread among its correct answers) + 0.2 the same with the gap min'd
    over ref and tied + 0.01 mean tanh(min gap / spread - 1). Accurate = worst correct > best wrong. The margin
    terms are means over the prompts in both sets: with none, they are the mean of nothing, NaN, and so is the
    score (as the script computes it)."""
    stats: dict[tuple[str, object], tuple[bool, float | None, float]] = {}
    for key, good, bad in items.select("item_key", "r_chosen", "r_rejected").iter_rows():
        kind, _, pid = key.partition(":")
        if kind not in ("ref", "tied"):
            raise ValueError(f"Ties item {key!r}: Ties items need item_key 'ref:<id>' or 'tied:<id>'")
        gap = min(good) - max(bad)
        stats[(kind, int(pid) if pid.isdigit() else pid)] = (gap > 0, max(good) - min(good) if len(good) > 1
                                                             else None, gap)
    ref = {pid: v for (kind, pid), v in stats.items() if kind == "ref"}
    tied = {pid: v for (kind, pid), v in stats.items() if kind == "tied"}
    ref_acc = float(np.mean([v[0] for v in ref.values()])) if ref else 0.0
    tied_acc = float(np.mean([v[0] for v in tied.values()])) if tied else 0.0
    both = sorted(set(ref) & set(tied), key=str)
    if not both:
        return float("nan")
    if any(tied[p][1] is None for p in both):
        raise ValueError("a Ties 'tied:<id>' item has one correct answer: its spread is undefined")
    spread = np.array([tied[p][1] for p in both], dtype=float)
    gap_tied = np.array([tied[p][2] for p in both])
    gap_hard = np.minimum(gap_tied, np.array([ref[p][2] for p in both]))
    with np.errstate(divide="ignore", invalid="ignore"):
        margin = np.nan_to_num(np.tanh(gap_hard / spread - 1), nan=0.0)
    return float(0.3 * tied_acc + 0.3 * ref_acc + 0.2 * np.mean(gap_tied > spread) + 0.2 * np.mean(gap_hard > spread)
                 + 0.01 * np.mean(margin))


def _rows(g: pl.DataFrame, section: str, score: float) -> dict:
    return {"section": section, "n": g.height, "score": float(score), "truncated": int(g["truncated"].sum())}


def benchmark_scores(bench: str, g: pl.DataFrame) -> list[dict]:
    """Section rows and an `overall` row for one benchmark's scored items (g has `credit`, `truncated`)."""
    out: list[dict] = []
    by = {k[0]: v for k, v in g.group_by("section", maintain_order=True)}
    if bench == "rewardbench":
        subs = {k[0]: v for k, v in g.group_by("subset", maintain_order=True)}
        acc = {s: float(v["credit"].mean()) for s, v in subs.items()}
        out += [_rows(v, f"subset:{s}", acc[s]) for s, v in sorted(subs.items())]
        for sec in ("Chat", "Chat Hard", "Safety", "Reasoning"):
            present = [s for s in acc if RB1_SECTIONS.get(s) == sec]
            if present:
                w = sum(RB1_EXAMPLE_COUNTS[s] for s in present)
                out.append(_rows(by[sec], sec, sum(acc[s] * RB1_EXAMPLE_COUNTS[s] for s in present) / w))
        sections = [r for r in out if not r["section"].startswith("subset:")]
    elif bench == "rewardbench2":
        for sec, v in sorted(by.items()):
            out.append(_rows(v, sec, ties_score(v) if sec == "Ties" else v["credit"].mean()))
        sections = out
    elif bench == "rm-bench":
        levels = {"easy": [], "normal": [], "hard": []}
        for sec, v in sorted(by.items()):
            cells = v.with_columns(level=pl.col("subset").str.split(":").list.first()).group_by(
                "subset", "level").agg(acc=pl.col("credit").mean())
            lv = {lvl: float(cells.filter(pl.col("level") == lvl)["acc"].mean()) for lvl in levels}
            for lvl, val in lv.items():
                levels[lvl].append(val)
                out.append(_rows(v.filter(pl.col("subset").str.starts_with(lvl)), f"{sec}:{lvl}", val))
            out.append(_rows(v, sec, float(np.mean(list(lv.values())))))
        out += [_rows(g.filter(pl.col("subset").str.starts_with(lvl)), lvl, float(np.mean(vals)))
                for lvl, vals in levels.items() if vals]
        sections = [r for r in out if ":" not in r["section"] and r["section"] not in levels]
    elif bench == "judgebench":
        # per response-model set (JudgeBench publishes GPT-4o's 350 pairs and Claude's 270; its leaderboard reports
        # GPT-4o's): `<model>/<category>`, `<model>/overall` (the paper's unweighted mean of categories) and
        # `<model>/overall_official` (pooled, what compute_final_metrics prints); the same over every pair as
        # `<category>`, `pooled`, `pooled_official`. `overall` / `overall_official` are the leaderboard set's when
        # it is present, else the pooled ones.
        g = g.with_columns(response_model=pl.col("subset").str.split(":").list.get(2, null_on_oob=True)
                           .fill_null("unknown"))
        sets = {k[0]: v for k, v in g.group_by("response_model", maintain_order=True)}

        def paper(frame: pl.DataFrame, prefix: str) -> tuple[list[dict], float, float]:
            cats = [_rows(v, f"{prefix}{sec[0]}", v["credit"].mean())
                    for sec, v in sorted(frame.group_by("section"), key=lambda kv: kv[0][0])]
            return cats, float(np.mean([r["score"] for r in cats])), float(frame["credit"].mean())

        cats, pooled, pooled_off = paper(g, "")
        out += cats + [_rows(g, "pooled", pooled), _rows(g, "pooled_official", pooled_off)]
        for m, v in sorted(sets.items()):
            cats_m, mean_m, off_m = paper(v, f"{m}/")
            out += cats_m + [_rows(v, f"{m}/overall", mean_m), _rows(v, f"{m}/overall_official", off_m)]
        lead = sets.get(JUDGEBENCH_LEADERBOARD_SET)
        if lead is not None:
            _, mean_l, off_l = paper(lead, "")
            out += [_rows(lead, "overall", mean_l), _rows(lead, "overall_official", off_l)]
        else:
            out += [_rows(g, "overall", pooled), _rows(g, "overall_official", pooled_off)]
        return out
    else:  # ppe-correctness, rmb, synth-bench: mean of sections; ppe-preference, gold_test: pooled
        out += [_rows(v, sec, v["credit"].mean()) for sec, v in sorted(by.items())]
        pooled = bench in ("gold_test", "ppe-preference")
        sections = [_rows(g, "all", g["credit"].mean())] if pooled else out
    out.append(_rows(g, "overall", float(np.mean([r["score"] for r in sections]))))
    return out


def aggregate(scored: pl.DataFrame, rm_version: str, max_len: int = 0) -> pl.DataFrame:
    """Per-section and overall rows of every benchmark in `scored` (items with r_chosen, r_rejected, truncated)."""
    scored = scored.with_columns(credit=pl.struct("benchmark", "r_chosen", "r_rejected", "subset").map_elements(
        lambda r: credit(r["benchmark"], r["r_chosen"], r["r_rejected"], r["subset"] or ""),
        return_dtype=pl.Float64))
    rows = []
    for (bench,), g in scored.group_by("benchmark", maintain_order=True):
        rows += [{"rm_version": rm_version, "benchmark": bench, "max_len": max_len, **r}
                 for r in benchmark_scores(bench, g)]
    return pl.DataFrame(rows, schema=RESULT_SCHEMA) if rows else pl.DataFrame(schema=RESULT_SCHEMA)


def table1(results: pl.DataFrame, real: list[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Paper Table-1 shape: one row per RM, one column per real benchmark (overall) and their unweighted average;
    then the in-distribution block (gold_test, synth-bench), never averaged in."""
    ov = results.filter(pl.col("section") == "overall")
    wide = ov.pivot(on="benchmark", index="rm_version", values="score").sort("rm_version")
    cols = [c for c in real if c in wide.columns]
    main = wide.select("rm_version", *cols)
    if cols:
        main = main.with_columns(average=pl.mean_horizontal(cols))
    other = [c for c in wide.columns if c not in cols and c != "rm_version"]
    return main, wide.select("rm_version", *other)


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


BIAS_SCHEMA = {"rm_version": pl.String, "benchmark": pl.String, "comparisons": pl.Int64,
               "acc_chosen_longer": pl.Float64, "n_chosen_longer": pl.Int64, "acc_chosen_shorter": pl.Float64,
               "n_chosen_shorter": pl.Int64, "spearman_reward_length": pl.Float64, "small_margin_share": pl.Float64}
SMALL_MARGIN = 0.01  # a comparison decided by less than 1% of the model's reward spread on the benchmark


def bias_diagnostics(resp: pl.DataFrame, rm_version: str) -> pl.DataFrame:
    """What RM users check first, per benchmark, from the per-response rewards: pairwise accuracy over every
    (chosen, rejected) comparison when the chosen response is the longer one vs the shorter one (length in
    characters of the response; equal lengths counted in neither), Spearman correlation of reward with response
    length over the benchmark's distinct responses, and the share of comparisons decided by a margin under
    SMALL_MARGIN x the standard deviation of the model's rewards there (scale-free: models' rewards differ in
    scale). resp: `score_items`' per-response rows (benchmark, item_id, role, response, reward)."""
    if resp.height == 0:
        return pl.DataFrame(schema=BIAS_SCHEMA)
    r = resp.select("benchmark", "item_id", "role", "reward", length=pl.col("response").str.len_chars())
    c = r.filter(pl.col("role") == "chosen").drop("role")
    x = r.filter(pl.col("role") == "rejected").drop("role")
    pairs = c.join(x, on=["benchmark", "item_id"], suffix="_r").with_columns(
        right=pl.col("reward") > pl.col("reward_r"), gap=(pl.col("reward") - pl.col("reward_r")).abs())
    spread = r.group_by("benchmark").agg(sd=pl.col("reward").std())
    rank = (resp.unique(["benchmark", "text_key"]).select("benchmark", "reward", length=pl.col("response")
                                                           .str.len_chars())
            .group_by("benchmark").agg(rho=pl.corr("reward", "length", method="spearman")))
    longer, shorter = pl.col("length") > pl.col("length_r"), pl.col("length") < pl.col("length_r")
    out = (pairs.join(spread, on="benchmark").group_by("benchmark").agg(
        comparisons=pl.len(),
        acc_chosen_longer=pl.col("right").filter(longer).mean(), n_chosen_longer=longer.sum(),
        acc_chosen_shorter=pl.col("right").filter(shorter).mean(), n_chosen_shorter=shorter.sum(),
        small_margin_share=(pl.col("gap") < SMALL_MARGIN * pl.col("sd").fill_null(0.0)).mean())
           .join(rank, on="benchmark", how="left").rename({"rho": "spearman_reward_length"}))
    return out.with_columns(rm_version=pl.lit(rm_version)).select(list(BIAS_SCHEMA)).cast(BIAS_SCHEMA).sort(
        "benchmark")
