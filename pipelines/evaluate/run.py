"""Evaluating RMs: every model on every benchmark plus the in-distribution gold_test, the per-item rewards kept, a
leak check, and the Table-1 report. The Dagster asset `rm_evaluation` configures and calls `evaluate_models`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from pipelines.compute import Engine
from pipelines.evaluate.benchmarks import (BENCHMARK_SCHEMA, REAL_BENCHMARKS, RM_BENCH_DOMAINS, BenchmarkFormatError,
                                           check_selection, present_benchmarks, read_benchmarks)
from pipelines.evaluate.harness import (BIAS_SCHEMA, REWARD_SCHEMA, RESULT_SCHEMA, aggregate, bias_diagnostics, credit,
                                       responses, score_items, table1)
from pipelines.lake import Lake
from pipelines.rm.registry import ModelRef, best_of, data_manifest, latest, ref_of
from pipelines.schema import item_pair_ids
from pipelines.tables import BENCHMARK_ITEMS, RM_EVALUATION, RM_REWARDS, SEED


def evaluation_items(lake: Lake, benchmarks_dir: Path, only: list[str] | None = None) -> pl.DataFrame:
    """Every benchmark item under `benchmarks_dir` (as published, see pipelines.evaluate.benchmarks) plus the human
    gold_test split, as one frame of BENCHMARK_SCHEMA rows; with `only`, the named benchmarks alone (gold_test
    included when named; a name that is not there is refused)."""
    gold = gold_test_items(lake)
    if only is not None:
        check_selection(only, sorted(present_benchmarks(benchmarks_dir) + (["gold_test"] if gold.height else [])),
                        f"{benchmarks_dir} (+ the lake's gold_test)")
    bench, _ = read_benchmarks(benchmarks_dir, None if only is None else [b for b in only if b != "gold_test"])
    return _with_gold(pl.DataFrame(bench, schema=pl.Schema(BENCHMARK_SCHEMA)) if bench else None,
                      gold if only is None or "gold_test" in only else pl.DataFrame())


def _with_gold(bench: pl.DataFrame | None, gold: pl.DataFrame) -> pl.DataFrame:
    parts = [bench] if bench is not None and bench.height else []
    if gold.height:
        parts.append(gold.cast({"item_id": pl.Int64}))
    return pl.concat(parts, how="diagonal_relaxed") if parts else pl.DataFrame()


def benchmark_items_from_lake(lake: Lake, version: int | None = None) -> pl.DataFrame:
    """The benchmark items the `benchmarks` asset wrote to `benchmark_pairs` (at `version`), plus gold_test: the
    very items decontamination used (its 13-gram prompts and exact pair ids come from that table), so nothing is
    reported that ingest never checked against. A file added to the folder afterwards is scored once `benchmarks`
    is materialized again (`folder_drift` says which)."""
    if not lake.exists(BENCHMARK_ITEMS):
        raise FileNotFoundError(f"no `{BENCHMARK_ITEMS}` table: materialize the `benchmarks` asset first")
    bench = lake.read(BENCHMARK_ITEMS, version=version).cast(dict(pl.Schema(BENCHMARK_SCHEMA)))
    return _with_gold(bench, gold_test_items(lake))


def folder_drift(items: pl.DataFrame, benchmarks_dir: Path) -> dict[str, dict]:
    """Per benchmark, items in the folder but not in `items` (`benchmark_pairs`) and the reverse: non-empty when a
    file was added or removed after the `benchmarks` asset last ran (those items are neither decontaminated nor
    scored until it runs again). A folder that no longer reads says why."""
    try:
        folder, _ = read_benchmarks(benchmarks_dir)
    except BenchmarkFormatError as e:
        return {"unreadable": {"error": str(e)}}
    on_disk = pl.DataFrame(folder, schema=pl.Schema(BENCHMARK_SCHEMA)).select("benchmark", "item_key") if folder \
        else pl.DataFrame(schema={"benchmark": pl.String, "item_key": pl.String})
    table = items.filter(pl.col("benchmark") != "gold_test").select("benchmark", "item_key") if items.height else \
        on_disk.clear()
    new = on_disk.join(table, on=["benchmark", "item_key"], how="anti").group_by("benchmark").len()
    gone = table.join(on_disk, on=["benchmark", "item_key"], how="anti").group_by("benchmark").len()
    out: dict[str, dict[str, int]] = {}
    for frame, what in ((new, "in_folder_not_in_table"), (gone, "in_table_not_in_folder")):
        for b, n in frame.iter_rows():
            out.setdefault(b, {})[what] = n
    return out


def models_to_evaluate(lake: Lake, family: list[str], tracking_uri: str, cache_root: str | Path) -> list[ModelRef]:
    """The latest registered version of every family member (`synpref-rm-<name>`), the gold RM and the best
    Stage-1 RM, as references workers fetch by their MLflow URI."""
    rows = [latest(lake, name=f"synpref-rm-{b}") for b in family] + [latest(lake, role="gold"),
                                                                      best_of(lake, "stage1")]
    return [ref_of(r, tracking_uri, cache_root) for r in rows if r is not None]


def gold_test_items(lake: Lake) -> pl.DataFrame:
    """The human gold_test split as benchmark items (section = task category): reported, never trained or selected on."""
    if not lake.exists(SEED):
        return pl.DataFrame()
    g = lake.scan(SEED).filter(pl.col("split") == "gold_test").collect()
    return g.select(benchmark=pl.lit("gold_test"), item_id=pl.int_range(pl.len(), dtype=pl.Int64),
                    section=pl.col("task_category").fill_null("other"), subset=pl.lit(""), history="history",
                    chosen=pl.concat_list("chosen"), rejected=pl.concat_list("rejected"), item_key="pair_id")


def model_max_len(ref: ModelRef, cap: int) -> int:
    """The model's own context (config.max_position_embeddings), capped: the evaluation length policy."""
    from transformers import AutoConfig  # here: transformers stays out of start-up

    n = getattr(AutoConfig.from_pretrained(ref.local_path()), "max_position_embeddings", None) or cap
    return int(min(n, cap))


@dataclass
class Evaluation:
    results: pl.DataFrame
    rewards: pl.DataFrame
    table1: pl.DataFrame
    in_distribution: pl.DataFrame
    lengths: pl.DataFrame  # per model and benchmark: texts scored whole / history cut / response cut
    leaks: pl.DataFrame
    bias: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=BIAS_SCHEMA))  # bias_diagnostics
    author_items: pl.DataFrame | None = None  # JudgeBench, RewardBench 2 and RMB items, for the authors' files


def evaluate_models(lake: Lake, items: pl.DataFrame, refs: list[ModelRef], engine: Engine, *,
                    max_len_cap: int = 4096) -> Evaluation:
    """Score `items` (benchmark items incl. gold_test) under every model, once per distinct text per model. Each
    result row names the engine that scored it (`engine`: the report shows it per model)."""
    results, rewards, lengths, bias = [], [], [], []
    engine_name = engine.describe()
    models = {ref.rm_version: (ref, model_max_len(ref, max_len_cap)) for ref in refs}
    resp_all = responses(items) if items.height else None
    texts = resp_all.unique("text_key", keep="first").select("text_key", "history", "response") if refs else None
    by_model = engine.score_texts(texts, models) if refs and items.height else {}
    for ref in refs:
        max_len = models[ref.rm_version][1]
        scored, resp = score_items(items, lambda _texts, v=ref.rm_version: by_model[v], resp_all)
        results.append(aggregate(scored, ref.rm_version, max_len).with_columns(engine=pl.lit(engine_name)))
        bias.append(bias_diagnostics(resp, ref.rm_version))
        rewards.append(resp.select(pl.lit(ref.rm_version).alias("rm_version"), "benchmark", "item_key", "role", "idx",
                                   "reward", "tokens", "truncated").cast(REWARD_SCHEMA))
        lengths.append(resp.unique(["benchmark", "text_key"]).group_by("benchmark").agg(
            texts=pl.len(), whole=(pl.col("truncated") == "none").sum(),
            history_cut=(pl.col("truncated") == "history").sum(),
            response_cut=(pl.col("truncated") == "response").sum()).with_columns(
            rm_version=pl.lit(ref.rm_version), max_len=pl.lit(max_len)))
    res = pl.concat(results) if results else pl.DataFrame(schema={**RESULT_SCHEMA, "engine": pl.String})
    t1, ind = table1(res, REAL_BENCHMARKS) if res.height else (pl.DataFrame(), pl.DataFrame())
    return Evaluation(res, pl.concat(rewards) if rewards else pl.DataFrame(schema=REWARD_SCHEMA), t1, ind,
                      pl.concat(lengths).sort("rm_version", "benchmark") if lengths else pl.DataFrame(),
                      leaks(lake, items), pl.concat(bias) if bias else pl.DataFrame(schema=BIAS_SCHEMA),
                      items.filter(pl.col("benchmark").is_in(["judgebench", "rewardbench2", "rmb"])).select(
                          "benchmark", "item_key", "section", "subset", "history", "chosen", "rejected")
                      if items.height else None)


def reported_pair_ids(items: pl.DataFrame) -> pl.DataFrame:
    """pair_id of every reported comparison in both orientations (`item_pair_ids`: a flipped twin from another
    source is the same comparison), plus gold_test's own raw pair ids."""
    parts = [item_pair_ids(items),
             items.filter(pl.col("benchmark") == "gold_test").select("benchmark", pair_id="item_key")]
    return pl.concat(parts).unique()


def leaks(lake: Lake, items: pl.DataFrame) -> pl.DataFrame:
    """Reported pairs that some registered RM trained on or was selected on (must be empty): benchmark, pair_id,
    rm_version, use."""
    if items.height == 0:
        return pl.DataFrame(schema={"benchmark": pl.String, "pair_id": pl.String, "rm_version": pl.String,
                                    "use": pl.String})
    rep = reported_pair_ids(items).lazy()
    return data_manifest(lake).join(rep, on="pair_id", how="inner").select(
        "benchmark", "pair_id", "rm_version", "use").collect()


def write_evaluation(lake: Lake, ev: Evaluation) -> int:
    """Each model's rows replace its earlier ones (one commit per model and table). A table written before rows
    named their engine gains the column (its older rows read null: "not recorded" in the report)."""
    v = 0
    for rm_version in ev.results["rm_version"].unique().to_list():
        v = lake.replace_where(RM_EVALUATION, ev.results.filter(pl.col("rm_version") == rm_version).to_arrow(),
                               "rm_version", rm_version, schema_mode="merge")
        lake.replace_where(RM_REWARDS, ev.rewards.filter(pl.col("rm_version") == rm_version).to_arrow(),
                           "rm_version", rm_version)
    return v


def table1_text(ev: Evaluation, md_table) -> str:
    """Table 1 as markdown, or, with no real benchmark file present, what to run to get one."""
    if len(ev.table1.columns) > 1 and ev.table1.height:
        return md_table(ev.table1)
    return ("_No real benchmark was scored: Table 1 needs published benchmark files. Add them with "
            "`synpref benchmarks add PATH` (e.g. RewardBench's filtered-00000-of-00001.parquet, RM-Bench's "
            "chat_filtered.json) or `synpref benchmarks fetch NAME` (from the Hugging Face Hub or its cache), then "
            "re-materialize rm_evaluation. gold_test below is scored either way._")


def engines_of(results: pl.DataFrame) -> pl.DataFrame:
    """rm_version -> the engine that scored it (rows written before engines were recorded: "not recorded")."""
    if results.height == 0:
        return pl.DataFrame(schema={"rm_version": pl.String, "engine": pl.String})
    eng = pl.col("engine") if "engine" in results.columns else pl.lit(None, pl.String)
    return results.select("rm_version", engine=eng.fill_null("not recorded")).unique().sort("rm_version")


def report_markdown(ev: Evaluation, md_table) -> str:
    per = ev.results.filter(~pl.col("section").str.starts_with("subset:")).sort(
        "rm_version", "benchmark", "section").drop("engine", "model_source", strict=False)
    leak_line = ("No reported pair was trained or selected on by any registered RM."
                 if ev.leaks.height == 0 else f"**{ev.leaks.height} reported pairs leak** (see the leaks table).")
    external = sorted(v for v in ev.results["rm_version"].unique().to_list() if v.startswith("external:")) \
        if ev.results.height else []
    if external:
        leak_line += (f" External models ({', '.join(external)}, scored by `synpref evaluate`): their training data "
                      "is unknown to this project, so the leak check does not cover them.")
    return "\n\n".join([
        "# RM evaluation (paper Table 1 shape)",
        "Real benchmarks, each scored as its authors' script does; `average` is their unweighted mean.",
        table1_text(ev, md_table),
        "## In-distribution (never averaged in)",
        "gold_test: the human split no RM trained or was selected on; synth-bench: project-made pairs.",
        md_table(ev.in_distribution),
        "## Length: texts scored whole or cut, per model and benchmark",
        "Each model is scored at its own context (`max_len`, capped); a cut text keeps the model's special tokens. "
        "`history_cut`: the conversation lost its oldest tokens; `response_cut`: the response alone did not fit.",
        md_table(ev.lengths),
        "## Biases: length and near-ties, per model and benchmark",
        "Pairwise accuracy over every (chosen, rejected) comparison when the chosen response is the longer vs the "
        "shorter one (characters; a large gap is a length bias), Spearman correlation of reward with response "
        "length, and the share of comparisons decided by less than 1% of the model's reward spread.",
        md_table(ev.bias) if ev.bias.height else "_no comparisons scored_",
        "## Engine: what scored each model",
        "Every model is scored through the same renderer and length policy; this names the runtime and precision "
        "(an engine's numerics can move a near-tie).",
        md_table(engines_of(ev.results)),
        "## Leaks", leak_line,
        "## Per section",
        md_table(per),
        f"Per-item rewards: Delta table `{RM_REWARDS}` (rm_version, benchmark, item_key, role, idx, reward, tokens, "
        "truncated): enough to recompute any score with the authors' scripts.",
    ]) + "\n"


def write_report(ev: Evaluation, out: Path, md_table, plt) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "rm_evaluation.md").write_text(report_markdown(ev, md_table))
    # one group of bars per benchmark, one colour per model, the legend outside the axes (below), labels at a
    # size the Dagster UI's preview keeps readable
    ov = ev.results.filter(pl.col("section") == "overall").sort("benchmark", "rm_version")
    benches = ov["benchmark"].unique(maintain_order=True).to_list()
    models = sorted(ov["rm_version"].unique().to_list())
    width = 0.8 / max(len(models), 1)
    has_bias = ev.bias.height > 0
    fig, axes = plt.subplots(1, 2 if has_bias else 1, figsize=(max(6.0, 1.3 * len(benches) + 2) + (4 if has_bias
                                                                                                    else 0), 4.2),
                             gridspec_kw={"width_ratios": [max(len(benches), 1), 2]} if has_bias else None)
    ax = axes[0] if has_bias else axes
    score = {(b, m): v for b, m, v in ov.select("benchmark", "rm_version", "score").iter_rows()}
    for k, m in enumerate(models):
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(benches))]
        ax.bar(xs, [score.get((b, m), float("nan")) for b in benches], width=width * 0.95, label=m,
               color=plt.get_cmap("tab10")(k % 10))
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(benches)), benches, fontsize=10, rotation=20 if len(benches) > 5 else 0)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (overall)", fontsize=10)
    ax.set_title("Reward models per benchmark (dashed: chance for pairwise accuracy)", fontsize=11)
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=max(1, min(len(models), 3)),
              frameon=False)
    if has_bias:  # length bias: accuracy when the chosen response is the longer vs the shorter one, all benchmarks
        bx = axes[1]
        pooled = ev.bias.group_by("rm_version").agg(
            longer=(pl.col("acc_chosen_longer") * pl.col("n_chosen_longer")).sum() / pl.col("n_chosen_longer").sum(),
            shorter=(pl.col("acc_chosen_shorter") * pl.col("n_chosen_shorter")).sum()
            / pl.col("n_chosen_shorter").sum())
        by = {r["rm_version"]: r for r in pooled.iter_rows(named=True)}
        for k, m in enumerate(models):
            if m in by:
                bx.bar([k - 0.2, k + 0.2], [by[m]["longer"] or 0.0, by[m]["shorter"] or 0.0], width=0.38,
                       color=[plt.get_cmap("tab10")(k % 10)] * 2, alpha=1.0, edgecolor="k", hatch=None)
                bx.bar([k + 0.2], [by[m]["shorter"] or 0.0], width=0.38, color="white", edgecolor=plt.get_cmap(
                    "tab10")(k % 10), hatch="//")
        bx.set_xticks(range(len(models)), [str(i + 1) for i in range(len(models))], fontsize=10)
        bx.set_ylim(0, 1)
        bx.set_title("length bias: chosen longer (solid)\nvs chosen shorter (hatched)", fontsize=10)
        bx.set_xlabel("model (legend order)", fontsize=9)
    fig.savefig(out / "rm_evaluation.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out / "rm_evaluation.md"


def evaluate_external(lake: Lake, model: str, engine: Engine, *, name: str | None = None,
                      benchmarks_dir: Path, tracking_uri: str = "", cache_root: str | Path = "",
                      max_len_cap: int = 4096, run_id: str = "",
                      only: list[str] | None = None) -> tuple[Evaluation, str]:
    """Any sequence-classification RM — a local HF folder, `models:/name/version` or a hub id from the local cache
    — scored on every added benchmark (and gold_test when the lake has one; `only`: the named ones) with the same
    renderer and formulas as the project's RMs, its rows written to the same tables (`rm_evaluation`,
    `rm_item_rewards`) under rm_version `external:<name>` (unique per model: `external_rm_version`), with lineage
    naming the model. Its training data is unknown to this project: the leak check cannot speak for it (the report
    says so). Returns (the evaluation, its rm_version)."""
    source = model_source(model)
    rm_version = external_rm_version(lake, source, name)
    items = evaluation_items(lake, benchmarks_dir, only)
    if items.height == 0:
        raise BenchmarkFormatError(f"nothing to score: no benchmark under {benchmarks_dir} and no gold_test in the "
                                   "lake. Add one with `synpref benchmarks add PATH` or `synpref benchmarks fetch "
                                   "NAME`.")
    ref = ModelRef(rm_version, model, tracking_uri, str(cache_root))
    ev = evaluate_models(lake, items, [ref], engine, max_len_cap=max_len_cap)
    ev.results = ev.results.with_columns(model_source=pl.lit(source))  # whose rows these are (unique names)
    v = write_evaluation(lake, ev)
    lake.record_lineage(run_id=run_id or f"evaluate-{rm_version}", asset="synpref evaluate", partition=model,
                        table=RM_EVALUATION, version_written=v, inputs=lake.input_versions([SEED]),
                        config={"model": model, "rm_version": rm_version, "max_len_cap": max_len_cap,
                                "benchmarks_dir": str(benchmarks_dir), "benchmarks": only},
                        counts={"items": items.height, "rows": ev.results.height})
    return ev, rm_version


def model_source(model: str) -> str:
    """What identifies an external model: a local folder by its absolute path (`best` and `./best` are one model,
    two folders named `best` are two), a `models:/` URI or hub id as given."""
    p = Path(model)
    return str(p.resolve()) if not model.startswith("models:/") and p.exists() else model


def external_rm_version(lake: Lake, source: str, name: str | None) -> str:
    """`external:<name>` for the model at `source`, never one another model's rows are under (its rows would be
    replaced). With `name`, that name (refused when it holds another model's rows). Without, the folder's name,
    then with its parents (`run-a/best`) until the name is free or already this model's; `models:/NAME/VERSION`
    -> NAME:VERSION."""
    owners: dict[str, set] = {}
    if lake.exists(RM_EVALUATION):
        lf = lake.scan(RM_EVALUATION)
        src = pl.col("model_source") if "model_source" in lf.collect_schema().names() else pl.lit(None, pl.String)
        for rv, s_ in lf.filter(pl.col("rm_version").str.starts_with("external:")).select(
                "rm_version", src.alias("s")).unique().collect().iter_rows():
            owners.setdefault(rv, set()).add(s_)
    if name:
        rv = f"external:{name}"
        others = sorted(str(o) for o in owners.get(rv, set()) - {source, None})
        if others:
            raise BenchmarkFormatError(f"--name {name}: {rv} already holds the rows of another model ({others[0]}); "
                                       "scoring this one under it would replace them. Choose another --name.")
        return rv
    if source.startswith("models:/"):
        cands = [source[len("models:/"):].replace("/", ":")]
    else:
        parts = [p for p in source.rstrip("/").split("/") if p]
        cands = ["/".join(parts[-k:]) for k in range(1, len(parts) + 1)]
    for label in cands:
        held = owners.get(f"external:{label}", set())
        if not held or held == {source}:
            return f"external:{label}"
    raise BenchmarkFormatError(f"every name derived from {source} ({', '.join(cands)}) already holds another "
                               "model's rows: give this one a name with --name NAME")


def evaluation_so_far(lake: Lake, latest: Evaluation) -> Evaluation:
    """Every model's rows in `rm_evaluation` (the project's RMs and external ones) with `latest`'s lengths and
    leak check: what the report shows after one more model was scored."""
    results = lake.read(RM_EVALUATION) if lake.exists(RM_EVALUATION) else latest.results
    t1, ind = table1(results, REAL_BENCHMARKS) if results.height else (pl.DataFrame(), pl.DataFrame())
    return Evaluation(results, latest.rewards, t1, ind, latest.lengths, latest.leaks, latest.bias)


def write_authors_formats(ev: Evaluation, rm_version: str, out: Path) -> list[Path]:
    """One model's results in each benchmark's own terms, for re-checking with the authors' scripts:
    `summary.json` ({benchmark: {section: score}}, fractions, with `overall`, JudgeBench's `overall_official`),
    `rm-bench-<domain>.json` (chat, code, math, safety): a JSON list of {id, score_chosen: [3], score_rejected: [3]}
    (styles in the published order), what RM-Bench's `compute_accuracy` reads as one domain's results, and, when
    every domain is present, `rm-bench.json` (the same rows with `domain`, read as total_dataset.json's);
    `judgebench.jsonl` (every pair) and `judgebench-<response_model>.jsonl` (one per published pairs file):
    JudgeBench's own per-pair output rows (`_judgebench_lines`); `rewardbench2.json`: reward-bench v2's per-item
    scores file (`_rewardbench2_scores`); `rmb.json`: RMB's per-pair result list (`_rmb_results`)."""
    import json
    import re

    out.mkdir(parents=True, exist_ok=True)
    res = ev.results.filter(pl.col("rm_version") == rm_version)
    summary: dict = {}
    for b, sec, score in res.select("benchmark", "section", "score").iter_rows():
        summary.setdefault(b, {})[sec] = score
    written = [out / "summary.json"]
    written[0].write_text(json.dumps(summary, indent=1, sort_keys=True))
    rw = ev.rewards.filter((pl.col("rm_version") == rm_version) & (pl.col("benchmark") == "rm-bench"))
    if rw.height:
        cells = rw.with_columns(parts=pl.col("item_key").str.split(":")).with_columns(
            domain=pl.col("parts").list.get(0), id=pl.col("parts").list.get(1),
            a=pl.col("parts").list.get(2).str.slice(0, 1).cast(pl.Int64),
            b=pl.col("parts").list.get(2).str.slice(1, 1).cast(pl.Int64))
        rows: dict = {}
        for domain, id_, a, b, role, reward in cells.select("domain", "id", "a", "b", "role", "reward").iter_rows():
            r = rows.setdefault((domain, id_), {"id": id_, "domain": domain, "score_chosen": [None] * 3,
                                                "score_rejected": [None] * 3})
            r["score_chosen" if role == "chosen" else "score_rejected"][a if role == "chosen" else b] = reward
        for r in rows.values():  # ids as published (integers where they were)
            r["id"] = int(r["id"]) if str(r["id"]).lstrip("-").isdigit() else r["id"]
        ordered = sorted(rows.values(), key=lambda r: (r["domain"], str(r["id"])))
        # compute_accuracy reads a file with `domain` as total_dataset.json: it splits it into chat, math, code and
        # safety (safety-* merged) and fails on a domain with no rows; a file without `domain` is one domain's. So:
        # one file per domain, always, and the combined file when every domain is present.
        by_domain: dict[str, list] = {}
        for r in ordered:
            by_domain.setdefault(RM_BENCH_DOMAINS[r["domain"]], []).append(
                {k: v for k, v in r.items() if k != "domain"})
        for d, part in sorted(by_domain.items()):
            written.append(out / f"rm-bench-{d}.json")
            written[-1].write_text(json.dumps(part, indent=1))
        if set(by_domain) == set(RM_BENCH_DOMAINS.values()):
            written.append(out / "rm-bench.json")
            written[-1].write_text(json.dumps(ordered, indent=1))
    jb = ev.rewards.filter((pl.col("rm_version") == rm_version) & (pl.col("benchmark") == "judgebench"))
    if jb.height and ev.author_items is not None:
        jb_items = ev.author_items.filter(pl.col("benchmark") == "judgebench").with_columns(
            response_model=pl.col("subset").str.split(":").list.get(2, null_on_oob=True).fill_null("unknown"))
        written.append(out / "judgebench.jsonl")  # every pair (compute_final_metrics: pooled_official)
        written[-1].write_text(_judgebench_lines(jb_items, jb, rm_version))
        for (model,), part in jb_items.group_by("response_model"):  # one file per published pairs file, as
            # run_judge.py writes one output per --pairs file (compute_final_metrics: <model>/overall_official)
            written.append(out / f"judgebench-{re.sub(r'[^A-Za-z0-9_.-]', '_', model)}.jsonl")
            written[-1].write_text(_judgebench_lines(part, jb.join(part.select("item_key"), on="item_key"),
                                                     rm_version))
    rb2 = ev.rewards.filter((pl.col("rm_version") == rm_version) & (pl.col("benchmark") == "rewardbench2"))
    if rb2.height and ev.author_items is not None:
        written.append(out / "rewardbench2.json")
        written[-1].write_text(json.dumps(_rewardbench2_scores(ev.author_items.filter(
            pl.col("benchmark") == "rewardbench2"), rb2, rm_version), indent=4, sort_keys=True))
    rmb = ev.rewards.filter((pl.col("rm_version") == rm_version) & (pl.col("benchmark") == "rmb"))
    if rmb.height and ev.author_items is not None:
        written.append(out / "rmb.json")
        written[-1].write_text(json.dumps(_rmb_results(ev.author_items.filter(pl.col("benchmark") == "rmb"), rmb),
                                          indent=2, ensure_ascii=False))
    return written


def write_all_authors_formats(ev: Evaluation, out: Path) -> Path:
    """Each RM's results in the benchmarks' own terms (summary.json, rm-bench.json, judgebench.jsonl, ...) under
    out/<rm_version>/, as `synpref evaluate --out` writes them: anyone can re-check a score with the authors'
    scripts."""
    for rm_version in sorted(ev.results["rm_version"].unique().to_list()):
        write_authors_formats(ev, rm_version, out / re.sub(r"[^A-Za-z0-9_.-]", "_", rm_version))
    return out


def log_evaluation(ev: Evaluation, report: Path, authors: Path, tracking_uri: str, experiment: str,
                   artifact_root: str) -> None:
    """One MLflow run for an evaluation: each RM's overall score per benchmark as a metric, the report, its plot
    and the authors-format files as artifacts."""
    import mlflow  # mlflow (and tracking, which imports it) are heavy: loaded only where an evaluation is logged

    from pipelines.rm import tracking

    with tracking.run(tracking_uri, experiment, "rm-evaluation", artifact_root, tags={"role": "evaluation"}):
        for r in ev.results.filter(pl.col("section") == "overall").iter_rows(named=True):
            mlflow.log_metric(f"{r['rm_version'].replace(':', '_v')}.{r['benchmark']}", r["score"])
        mlflow.log_artifact(str(report))
        mlflow.log_artifact(str(report.with_suffix(".png")))
        mlflow.log_artifacts(str(authors), artifact_path="authors")


def _rmb_results(items: pl.DataFrame, rewards: pl.DataFrame) -> list[dict]:
    """RMB's result file (Zhou-Zoey/RMB-Reward-Model-Benchmark `eval/scripts/my_run_rm.py`, e.g. its
    `eval/result/ArmoRM-Llama3-8B-v0.1_result.json`): per pairwise item `{pair_uid, category_path, chosen_reward,
    reject_reward, is_correct}`, is_correct = 1 if chosen_reward > reject_reward else 0; its ACC is the mean of
    is_correct over the files run. RMB publishes no script for best-of-N results; those rows take the same shape
    (`bon_uid`, `bon_best_reward`, `loser_rewards`, is_correct = 1 when the best beats every loser, the paper's
    rule), so every RMB section of the summary is the mean of is_correct over its rows."""
    r: dict = {}
    for key, role, idx, reward in rewards.select("item_key", "role", "idx", "reward").iter_rows():
        r.setdefault(key, {"chosen": {}, "rejected": {}})[role][idx] = reward
    out = []
    for key, section, subset in items.select("item_key", "section", "subset").iter_rows():
        kind, _, goal = section.partition(":")
        uid = key.partition(":")[2]
        path = "/".join(p for p in ("Pairwise_set" if kind == "pairwise" else "BoN_set", goal, subset) if p)
        good = r[key]["chosen"][0]
        bad = [r[key]["rejected"][i] for i in sorted(r[key]["rejected"])]
        if kind == "pairwise":
            out.append({"pair_uid": uid, "category_path": path, "chosen_reward": good, "reject_reward": bad[0],
                        "is_correct": int(good > bad[0])})
        else:
            out.append({"bon_uid": uid, "category_path": path, "bon_best_reward": good, "loser_rewards": bad,
                        "is_correct": int(all(good > b for b in bad))})
    return out


def _rewardbench2_scores(items: pl.DataFrame, rewards: pl.DataFrame, rm_version: str) -> dict:
    """reward-bench v2's per-item file (`results/eval-set-scores/<model>.json`, a column dict): per row `scores`
    (the chosen responses first, then the rejected), `subset`, `id`, `num_correct` and `results` (1/k when the
    first chosen ties k-1 others at the top, 1 alone, else 0; None for Ties, scored by `process_single_model`)."""
    r: dict = {}
    for key, role, idx, reward in rewards.select("item_key", "role", "idx", "reward").iter_rows():
        r.setdefault(key, {"chosen": {}, "rejected": {}})[role][idx] = reward
    cols: dict = {"id": [], "subset": [], "scores": [], "num_correct": [], "results": []}
    for key, section in items.select("item_key", "section").iter_rows():
        good = [r[key]["chosen"][i] for i in sorted(r[key]["chosen"])]
        bad = [r[key]["rejected"][i] for i in sorted(r[key]["rejected"])]
        cols["id"].append(key)
        cols["subset"].append(section)
        cols["scores"].append([*good, *bad])
        cols["num_correct"].append(len(good))
        cols["results"].append(None if section == "Ties" else credit("rewardbench2", good, bad))
    return {**cols, "model": rm_version, "model_type": "Seq. Classifier", "chat_template": None}


def _judgebench_lines(items: pl.DataFrame, rewards: pl.DataFrame, rm_version: str) -> str:
    """JudgeBench's own output rows as `run_judge.py` writes them for a reward-model judge in its default two-game
    mode (the shape of the authors' published reward-model outputs): the pair's fields plus `judge_name` and
    `judgments`, game 1 on (A, B) and game 2 on (B, A), each `{judgment: {judge_model, prompt, response, scores:
    [first, second]}, decision}` with decision 'A>B' if the first score is higher else 'B>A'.
    `compute_final_metrics` re-scores the file (renamed to its `dataset=judgebench,...,judge_model=...`
    convention, run_judge.py skips judging and prints the metrics); with `--single_game` it reads game 1 alone."""
    import json

    r = {(k, role): v for k, role, v in rewards.select("item_key", "role", "reward").iter_rows()}

    def game(first: float, second: float) -> dict:
        return {"judgment": {"judge_model": rm_version, "prompt": "", "response": "", "scores": [first, second]},
                "decision": "A>B" if first > second else "B>A"}

    lines = []
    for key, subset, history, chosen, rejected in items.select("item_key", "subset", "history", "chosen",
                                                               "rejected").iter_rows():
        label, source, model = (subset.split(":", 2) + ["unknown"])[:3]
        good, bad = r[(key, "chosen")], r[(key, "rejected")]
        (sa, sb), (ra, rb) = ((good, bad), (chosen[0], rejected[0])) if label == "A>B" else \
            ((bad, good), (rejected[0], chosen[0]))
        lines.append(json.dumps({
            "pair_id": key, "source": source, "question": history[-1]["content"] if history else "",
            "response_model": model, "response_A": ra, "response_B": rb, "label": label,
            "judge_name": "reward_model", "judgments": [game(sa, sb), game(sb, sa)]}, ensure_ascii=False))
    return "\n".join(lines) + "\n"
