"""Published benchmark files, read as their authors publish them, into benchmark items the harness scores.

Each benchmark lives in its own folder `<SYNPREF_HOME>/benchmarks/<name>/` (`synpref benchmarks add PATH` puts a
file there; `synpref benchmarks fetch NAME` downloads it from the Hugging Face Hub). A file's layout is recognised
from its columns, never from a loose name match, and must be the layout its folder's benchmark publishes: a file
that is not is refused with a message naming the layouts expected, never scored by some other rule.

An item is one prompt with its correct response(s) (`chosen`, a list) and wrong ones (`rejected`, a list), plus the
`section`/`subset` the benchmark's score is aggregated over and an `item_key` that names it in the per-item
rewards table. Benchmark files are small (thousands of items), so a file is read whole.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from pipelines.schema import MESSAGE_TYPE

BENCHMARK_SCHEMA = pa.schema([
    ("benchmark", pa.string()), ("item_id", pa.int64()), ("section", pa.string()), ("subset", pa.string()),
    ("history", pa.list_(MESSAGE_TYPE)), ("chosen", pa.list_(pa.string())), ("rejected", pa.list_(pa.string())),
    ("item_key", pa.string()),
])

# RewardBench 1: each published subset's section, and the example counts its script weighs subsets by
# (rewardbench/constants.py: EXAMPLE_COUNTS; math-prm counts 984, "upweighting to be equal to code").
RB1_SECTIONS = {
    **dict.fromkeys(["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
                    "Chat"),
    **dict.fromkeys(["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                     "llmbar-adver-GPTOut", "llmbar-adver-manual"], "Chat Hard"),
    **dict.fromkeys(["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
                     "donotanswer"], "Safety"),
    **dict.fromkeys(["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"], "Reasoning"),
}
RB1_EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28, "mt-bench-med": 40,
    "mt-bench-hard": 37, "math-prm": 984, "refusals-dangerous": 100, "refusals-offensive": 100,
    "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46, "xstest-should-refuse": 154, "xstest-should-respond": 250, "donotanswer": 136,
    "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}
RB2_SUBSETS = ["Factuality", "Precise IF", "Math", "Safety", "Focus", "Ties"]
RM_BENCH_DOMAINS = {"chat": "chat", "code": "code", "math": "math", "safety-refuse": "safety",
                    "safety-response": "safety"}
JUDGEBENCH_CATEGORIES = {"mmlu-pro": "knowledge", "livebench-reasoning": "reasoning", "livebench-math": "math",
                         "livecodebench": "coding"}


class BenchmarkFormatError(ValueError):
    pass


def _user(prompt: Any) -> list[dict[str, str]]:
    if isinstance(prompt, list):  # already messages
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    return [{"role": "user", "content": str(prompt)}]


def _item(bench: str, section: str, subset: str, history: list, chosen: list[str], rejected: list[str],
          key: str) -> dict:
    return {"benchmark": bench, "section": section, "subset": subset, "history": history,
            "chosen": [str(c) for c in chosen], "rejected": [str(r) for r in rejected], "item_key": key}


# --- layouts: detect(row) -> bool, parse(row, i, file) -> items --------------------------------------------------
def _rb1(row, i, f):
    subset = row["subset"]
    if subset not in RB1_SECTIONS:
        raise BenchmarkFormatError(f"RewardBench subset {subset!r} is not one of its 23 published subsets")
    return [_item("rewardbench", RB1_SECTIONS[subset], subset, _user(row["prompt"]), [row["chosen"]],
                  [row["rejected"]], str(row.get("id", i)))]


def _rb2(row, i, f):
    """reward-bench v2 scores a row's completions `chosen + rejected` with the first `num_correct` the correct ones
    (`load_bon_dataset_v2`, `process_single_model`); a row whose lists disagree with `num_correct` would be scored
    by another split, and a Ties id must be `ref:<int>` / `tied:<int>` (`process_single_model` parses it), with two
    or more correct answers on a tied prompt (its spread is undefined otherwise: the script fails)."""
    subset = row["subset"]
    if subset not in RB2_SUBSETS:
        raise BenchmarkFormatError(f"RewardBench 2 subset {subset!r} is not one of {RB2_SUBSETS}")
    if int(row["num_correct"]) != len(row["chosen"]):
        raise BenchmarkFormatError(f"RewardBench 2 row {row.get('id', i)}: num_correct {row['num_correct']} but "
                                   f"{len(row['chosen'])} chosen completions")
    if subset == "Ties":
        m = re.fullmatch(r"(ref|tied):(\d+)", str(row.get("id", "")))
        if m is None:
            raise BenchmarkFormatError(f"RewardBench 2 Ties id {row.get('id')!r}: expected 'ref:<int>' or "
                                       "'tied:<int>' (reward-bench's process_single_model pairs prompts by it)")
        if m.group(1) == "tied" and len(row["chosen"]) < 2:
            raise BenchmarkFormatError(f"RewardBench 2 Ties row {row['id']}: a tied prompt needs two or more "
                                       "correct answers (process_single_model measures their spread)")
    return [_item("rewardbench2", subset, "", _user(row["prompt"]), list(row["chosen"]), list(row["rejected"]),
                  str(row.get("id", i)))]


def _rm_bench(row, i, f):
    """RM-Bench's files ship extra columns (every file `subset`; chat `error`, `error_key`; code `language`,
    `task_id`): read what scoring needs, ignore the rest. The domain comes from the row's `domain` (the combined
    file), else the file's published name (chat_filtered.json, ...), else a `subset` naming a domain."""
    domain = row.get("domain") or _rm_bench_domain_from_name(f)
    if domain is None and str(row.get("subset", "")).lower() in RM_BENCH_DOMAINS:
        domain = str(row["subset"]).lower()
    if domain not in RM_BENCH_DOMAINS:
        raise BenchmarkFormatError(f"RM-Bench domain {domain!r} (from {'the row' if row.get('domain') else f.name}) "
                                   f"is not one of {sorted(RM_BENCH_DOMAINS)}: name the file as published "
                                   "(chat_filtered.json, code_filtered.json, ...)")
    # one item per (chosen style i, rejected style j): the cells of RM-Bench's 3x3 accuracy matrix
    out = []
    for a, c in enumerate(row["chosen"]):
        for b, r in enumerate(row["rejected"]):
            level = "normal" if a == b else ("easy" if a > b else "hard")
            out.append(_item("rm-bench", RM_BENCH_DOMAINS[domain], f"{level}:{a}{b}", _user(row["prompt"]), [c], [r],
                             f"{domain}:{row.get('id', i)}:{a}{b}"))  # ids repeat across domain files
    return out


def _rm_bench_domain_from_name(f: Path) -> str | None:
    name = f.name.lower()
    for d in sorted(RM_BENCH_DOMAINS, key=len, reverse=True):
        if name.startswith(d):
            return d
    return None


def _judgebench(row, i, f):
    label = str(row["label"]).replace(" ", "")
    if label not in ("A>B", "B>A"):
        raise BenchmarkFormatError(f"JudgeBench label {row['label']!r}: expected 'A>B' or 'B>A'")
    source = str(row["source"])
    cat = next((v for k, v in JUDGEBENCH_CATEGORIES.items() if source.startswith(k)), None)
    if cat is None:
        raise BenchmarkFormatError(f"JudgeBench source {source!r}: expected mmlu-pro-*, livebench-reasoning, "
                                   "livebench-math or livecodebench")
    model = judgebench_response_model(row, f)
    good, bad = (row["response_A"], row["response_B"]) if label == "A>B" else (row["response_B"], row["response_A"])
    # label, source and response model travel in `subset` ("A>B:livecodebench:gpt-4o-2024-05-13"): the per-pair file
    # for JudgeBench's own script (run.py `_judgebench_lines`) puts the responses back in their published A/B order,
    # and the score is reported per response-model set (the leaderboard's is GPT-4o's)
    return [_item("judgebench", cat, f"{label}:{source}:{model}", _user(row["question"]), [good], [bad],
                  str(row.get("pair_id", i)))]


JUDGEBENCH_LEADERBOARD_SET = "gpt-4o-2024-05-13"  # the pairs JudgeBench's leaderboard (and its paper) report


def judgebench_response_model(row: dict, f: Path) -> str:
    """The model that wrote a pair's responses: the row's `response_model` (every published row has it), else the
    authors' file name `dataset=judgebench,response_model=<m>.jsonl`, else 'unknown'."""
    m = row.get("response_model") or re.search(r"response_model=([^,]+?)(?:,|\.jsonl?$|$)", f.name)
    m = m if isinstance(m, str) else (m.group(1) if m else "unknown")
    if ":" in m:
        raise BenchmarkFormatError(f"JudgeBench response_model {m!r} contains ':'")
    return m


def _conversation(conv: list) -> tuple[list, str]:
    msgs = _user(conv)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise BenchmarkFormatError("a PPE conversation must end with the assistant's answer")
    return msgs[:-1], msgs[-1]["content"]


def _ppe_pref(row, i, f):
    winner = row["winner"]
    if "conversation_a" in row:
        ha, ra = _conversation(row["conversation_a"])
        hb, rb = _conversation(row["conversation_b"])
        if ha != hb:
            raise BenchmarkFormatError("PPE conversations a and b differ before the final answer")
        history = ha
    else:
        history, ra, rb = _user(row["prompt"]), row["response_1"], row["response_2"]
    if winner not in ("model_a", "model_b"):
        return []  # ties and both-bad votes carry no preference: counted by the reader as skipped
    good, bad = (ra, rb) if winner == "model_a" else (rb, ra)
    return [_item("ppe-preference", str(row.get("language") or "all"), "", history, [good], [bad],
                  str(row.get("question_id", i)))]


def _ppe_correctness(row, i, f):
    """One comparison per (correct, incorrect) response pair, as PPE scores a best-of-K set: the published rows
    carry `scores` (one bool per response) and `sampled_conflict_pairs` (the index pairs PPE evaluates); without
    them, every (correct, incorrect) pair of the row. Pooled per source benchmark (strict >); overall = mean of the
    sources."""
    n = max(int(k.split("_")[1]) for k in row if re.fullmatch(r"response_\d+", k))
    scores = row["scores"]
    if not isinstance(scores, (list, tuple)) or len(scores) < 2:
        raise BenchmarkFormatError(f"PPE correctness `scores` must be a list of booleans, one per response; got "
                                   f"{type(scores).__name__}")
    if len(scores) > n:
        raise BenchmarkFormatError(f"PPE correctness row {row.get('question_id', i)}: {len(scores)} scores for "
                                   f"{n} responses")
    pairs = row.get("sampled_conflict_pairs") or row.get("conflict_pairs")
    if not pairs:
        pairs = [(a, b) for a in range(len(scores)) for b in range(len(scores)) if scores[a] and not scores[b]]
    source = str(row.get("source") or re.sub(r"[-_]?best[-_]of[-_]k.*$", "", f.stem.lower()) or "all")
    base = f"{source}:{row.get('model_name', '')}:{row.get('question_id', i)}"  # a question once per model
    out = []
    for a, b in pairs:
        a, b = int(a), int(b)
        if bool(scores[a]) == bool(scores[b]):
            continue  # not a conflict: both right or both wrong
        good, bad = (a, b) if scores[a] else (b, a)
        rg, rb = row.get(f"response_{good + 1}"), row.get(f"response_{bad + 1}")
        if rg is None or rb is None:
            raise BenchmarkFormatError(f"PPE correctness row {base}: pair ({a}, {b}) names a missing response")
        out.append(_item("ppe-correctness", source, "", _user(row["prompt"]), [rg], [rb], f"{base}:{good}>{bad}"))
    return out


def _rmb_path(row) -> tuple[str, str]:
    parts = str(row.get("category_path", "")).split("/")
    return (parts[1] if len(parts) > 1 else "all"), "/".join(parts[2:])


def _rmb_pairwise(row, i, f):
    goal, sub = _rmb_path(row)
    return [_item("rmb", f"pairwise:{goal}", sub, _user(row["conversation_input"]), [row["chosen"]["answer"]],
                  [row["reject"]["answer"]], f"pairwise:{row.get('pair_uid', i)}")]


def _rmb_bon(row, i, f):
    goal, sub = _rmb_path(row)
    return [_item("rmb", f"bon:{goal}", sub, _user(row["conversation_input"]), [row["bon_best"]["answer"]],
                  [x["answer"] for x in row["loser_list"]], f"bon:{row.get('bon_uid', i)}")]


def _synth(row, i, f):
    return [_item("synth-bench", str(row.get("category") or "all"), "", _user(row["prompt"]), [row["chosen"]],
                  [row["rejected"]], str(row.get("id", i)))]


def _is_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


@dataclass(frozen=True)
class Layout:
    name: str
    benchmark: str
    columns: str  # what a row looks like, for error messages and the README
    detect: Callable[[dict], bool]
    parse: Callable[[dict, int, Path], list[dict]]


# A layout is recognised by the columns (and values) it needs, never by the absence of others: published files carry
# extra columns. Where two could match, the first wins and the order encodes each file's own markers: RewardBench 1
# by a `subset` that is one of its 23; RewardBench 2 by `num_correct` (before RM-Bench, whose lists of three it
# could also have); PPE preference by `winner`.
LAYOUTS = [
    Layout("rewardbench", "rewardbench", "prompt, chosen (str), rejected (str), subset, id  [allenai/reward-bench, "
           "filtered split]", lambda r: {"prompt", "chosen", "rejected", "subset"} <= set(r)
           and isinstance(r["chosen"], str) and r["subset"] in RB1_SECTIONS, _rb1),
    Layout("rewardbench2", "rewardbench2", "prompt, chosen (list), rejected (list), subset, id, num_correct  "
           "[allenai/reward-bench-2, test split]", lambda r: {"prompt", "chosen", "rejected", "subset"} <= set(r)
           and _is_list(r["chosen"]) and "num_correct" in r, _rb2),
    Layout("rm-bench", "rm-bench", "a JSON list of {id, prompt, chosen: [3 styles], rejected: [3 styles], domain?} "
           "(domain from the file name when absent: chat_*, code_*, math_*, safety-refuse_*, safety-response_*)  "
           "[THU-KEG/RM-Bench]", lambda r: {"prompt", "chosen", "rejected"} <= set(r) and _is_list(r["chosen"])
           and len(r["chosen"]) == 3 and _is_list(r["rejected"]) and len(r["rejected"]) == 3, _rm_bench),
    Layout("judgebench", "judgebench", "question, response_A, response_B, label (A>B | B>A), source, pair_id  "
           "[ScalerLab/JudgeBench]", lambda r: {"question", "response_A", "response_B", "label", "source"} <= set(r),
           _judgebench),
    Layout("ppe-preference", "ppe-preference", "winner (model_a | model_b), conversation_a/conversation_b (messages) "
           "or prompt/response_1/response_2  [lmarena-ai/PPE-Human-Preference-V1]",
           lambda r: "winner" in r and ({"conversation_a", "conversation_b"} <= set(r)
                                        or {"prompt", "response_1", "response_2"} <= set(r)), _ppe_pref),
    Layout("ppe-correctness", "ppe-correctness", "prompt, response_1..response_K, scores (one bool per response), "
           "sampled_conflict_pairs?, question_id, model_name  [lmarena-ai/PPE-*-Best-of-K; the source benchmark from "
           "the file name]", lambda r: {"prompt", "response_1", "scores"} <= set(r), _ppe_correctness),
    Layout("rmb-pairwise", "rmb", "a JSON list of {pair_uid, conversation_input (messages), chosen: {answer}, "
           "reject: {answer}, category_path}  [RMB Pairwise_set]",
           lambda r: {"conversation_input", "chosen", "reject"} <= set(r), _rmb_pairwise),
    Layout("rmb-bon", "rmb", "a JSON list of {bon_uid, conversation_input, bon_best: {answer}, loser_list: "
           "[{answer}], category_path}  [RMB BoN_set]",
           lambda r: {"conversation_input", "bon_best", "loser_list"} <= set(r), _rmb_bon),
    Layout("synth-bench", "synth-bench", "prompt, chosen, rejected, category  [written by synthetic_landing]",
           lambda r: {"prompt", "chosen", "rejected", "category"} <= set(r) and isinstance(r["chosen"], str), _synth),
]
BENCHMARKS = sorted({lay.benchmark for lay in LAYOUTS})
REAL_BENCHMARKS = [b for b in BENCHMARKS if b != "synth-bench"]  # Table 1's columns; synth-bench is in-distribution


def expected_layouts(benchmark: str | None = None) -> str:
    lays = [lay for lay in LAYOUTS if benchmark is None or lay.benchmark == benchmark]
    return "\n".join(f"  - {lay.benchmark} ({lay.name}): {lay.columns}" for lay in lays)


def load_rows(path: Path) -> list[dict]:
    """Every row of a benchmark file: a JSON list, JSON lines (optionally gzipped), or Parquet."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise BenchmarkFormatError(f"{path}: not a readable Parquet file ({e})") from None
    import gzip

    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as e:
        raise BenchmarkFormatError(f"{path}: not UTF-8 text (byte {e.start}); benchmark files are UTF-8 JSON, JSON "
                                   "lines or Parquet") from None
    except (OSError, EOFError) as e:
        raise BenchmarkFormatError(f"{path}: cannot be read ({e})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchmarkFormatError(f"{path}: not a complete JSON list ({e.msg} at line {e.lineno}, column "
                                       f"{e.colno}); a truncated download?") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BenchmarkFormatError(f"{path}: line {n + 1} is not JSON ({e.msg})") from e
    if not all(isinstance(r, dict) for r in rows):
        raise BenchmarkFormatError(f"{path}: expected one JSON object per row")
    return rows


def detect_layout(rows: list[dict], path: Path) -> Layout:
    if not rows:
        raise BenchmarkFormatError(f"{path}: no rows")
    for lay in LAYOUTS:
        if lay.detect(rows[0]):
            return lay
    raise BenchmarkFormatError(f"{path}: its rows (columns {sorted(rows[0])}) match no published benchmark layout. "
                               f"Expected one of:\n{expected_layouts()}")


BENCHMARK_FILES = (".json", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet")


def read_benchmark_dir(folder: Path) -> tuple[list[dict], dict[str, int]]:
    """Items of the benchmark in `folder` (named after it). Returns (items, {"rows": n, "skipped": m}) where skipped
    rows carry no comparison (a tie vote, a prompt whose responses are all right)."""
    bench = folder.name
    if bench not in BENCHMARKS:
        raise BenchmarkFormatError(f"{folder}: '{bench}' is not a benchmark SynPref knows. Benchmarks and their "
                                   f"layouts:\n{expected_layouts()}\nPut files in place with `synpref benchmarks add "
                                   "PATH --name NAME`.")
    files = sorted(p for p in folder.iterdir() if p.name.lower().endswith(BENCHMARK_FILES))
    if not files:
        raise BenchmarkFormatError(f"{folder}: no benchmark file ({', '.join(BENCHMARK_FILES)})")
    items, stats = [], {"rows": 0, "skipped": 0}
    for f in files:
        got, st = read_benchmark_file(f, bench)
        items += got
        stats["rows"] += st["rows"]
        stats["skipped"] += st["skipped"]
    _check_unique_keys(items, bench)
    for n, it in enumerate(items):
        it["item_id"] = n
    return items, stats


def read_benchmark_file(f: Path, bench: str) -> tuple[list[dict], dict[str, int]]:
    """Items of one file of benchmark `bench`: its layout must be that benchmark's, every row must parse."""
    rows = load_rows(f)
    lay = detect_layout(rows, f)
    if lay.benchmark != bench:
        raise BenchmarkFormatError(f"{f}: this is a {lay.benchmark} file ({lay.name} layout), not {bench}. "
                                   f"{bench} is published as:\n{expected_layouts(bench)}")
    return _parse_rows(rows, lay, f)


def _parse_rows(rows: list[dict], lay: Layout, f: Path, named: Path | None = None) -> tuple[list[dict], dict]:
    """Every row of a file through its layout. `named`: the name the file will be read under (RM-Bench's domain
    and PPE's source come from it) when that is not `f`'s own."""
    items, stats = [], {"rows": 0, "skipped": 0}
    for i, row in enumerate(rows):
        try:
            got = lay.parse(row, i, named or f)
        except KeyError as e:
            raise BenchmarkFormatError(f"{f} row {i}: missing field {e} of the {lay.name} layout") from e
        except (TypeError, ValueError) as e:
            if isinstance(e, BenchmarkFormatError):
                raise BenchmarkFormatError(f"{f} row {i}: {e}") from None
            raise BenchmarkFormatError(f"{f} row {i}: a field of the {lay.name} layout has the wrong type ({e})") from e
        stats["rows"] += 1
        stats["skipped"] += not got
        items += got
    return items, stats


def _check_unique_keys(items: list[dict], bench: str) -> None:
    """Per-item rewards are keyed by (benchmark, item_key): two items under one key would overwrite each other."""
    seen: dict[str, int] = {}
    for it in items:
        seen[it["item_key"]] = seen.get(it["item_key"], 0) + 1
    dup = [k for k, n in seen.items() if n > 1]
    if dup:
        raise BenchmarkFormatError(f"{bench}: {len(dup)} item keys occur more than once (e.g. {dup[:3]}): the same "
                                   "file added twice, or a file and the combined file holding it? Keep one.")


def present_benchmarks(root: Path) -> list[str]:
    """The benchmark folders under `root`."""
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []


def check_selection(only: list[str], present: list[str], where: str) -> None:
    """A named benchmark that is not there is refused (never silently dropped from the run)."""
    unknown = [b for b in only if b not in present]
    if unknown:
        raise BenchmarkFormatError(f"--benchmarks {','.join(unknown)}: not present ({where} holds "
                                   f"{', '.join(present) or 'nothing'}). Known benchmarks: {', '.join(BENCHMARKS)}; "
                                   "add one with `synpref benchmarks add PATH` or `synpref benchmarks fetch NAME`.")


def read_benchmarks(root: Path, only: list[str] | None = None) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """Every benchmark folder under `root` (stray files there are refused: each benchmark is a folder); with
    `only`, those benchmarks alone (one that is not there is refused)."""
    if only is not None:
        check_selection(only, present_benchmarks(root), str(root))
    if not root.exists():
        return [], {}
    stray = [p.name for p in root.iterdir() if p.is_file()]
    if stray:
        raise BenchmarkFormatError(f"{root}: files {stray} sit outside a benchmark folder; each benchmark is a folder "
                                   f"<name>/ (use `synpref benchmarks add PATH --name NAME`). Benchmarks:\n"
                                   f"{expected_layouts()}")
    items, stats = [], {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and (only is None or p.name in only)):
        got, st = read_benchmark_dir(folder)
        items += got
        stats[folder.name] = st
    return items, stats


# --- add / fetch --------------------------------------------------------------------------------------------------
# Where each benchmark is published on the Hugging Face Hub (dataset repo, files). RMB is published on GitHub only.
HUB = {
    "rewardbench": [("allenai/reward-bench", "data/filtered-00000-of-00001.parquet")],
    "rewardbench2": [("allenai/reward-bench-2", "data/test-00000-of-00001.parquet")],
    "rm-bench": [("THU-KEG/RM-Bench", "total_dataset.json")],
    "judgebench": [("ScalerLab/JudgeBench", "data/gpt-00000-of-00001.parquet")],
    "ppe-preference": [("lmarena-ai/PPE-Human-Preference-V1", "data/test-00000-of-00001.parquet")],
    "ppe-correctness": [(f"lmarena-ai/PPE-{b}-Best-of-K", "data/train-00000-of-00001.parquet")
                        for b in ("MMLU-Pro", "MATH", "GPQA", "IFEval", "MBPP-Plus")],
}


def add_benchmark(src: Path, root: Path, name: str | None = None, as_name: str | None = None) -> Path:
    """Copy a published benchmark file into `root/<name>/` (as `as_name` when given), after checking its layout is
    that benchmark's."""
    import os
    import shutil
    import uuid

    if not src.is_file():
        raise BenchmarkFormatError(f"{src}: no such file")
    rows = load_rows(src)
    lay = detect_layout(rows, src)
    name = name or lay.benchmark
    if name not in BENCHMARKS:
        raise BenchmarkFormatError(f"unknown benchmark {name!r}. Benchmarks and their layouts:\n{expected_layouts()}")
    if lay.benchmark != name:
        raise BenchmarkFormatError(f"{src} is a {lay.benchmark} file ({lay.name} layout), not {name}. {name} is "
                                   f"published as:\n{expected_layouts(name)}")
    dst = root / name / (as_name or src.name)
    if not dst.name.lower().endswith(BENCHMARK_FILES):
        raise BenchmarkFormatError(f"{dst.name}: a benchmark file is named *{', *'.join(BENCHMARK_FILES)}")
    if dst.exists():  # never overwrite: RMB ships Pairwise_set/.../S1.json and BoN_set/.../S1.json, PPE a
        # train-00000-of-00001.parquet per benchmark; the second would replace the first's items
        import filecmp

        if filecmp.cmp(src, dst, shallow=False):
            return dst  # the same file again: nothing changes
        raise BenchmarkFormatError(f"{dst} already holds another file of that name; nothing was changed. Add this "
                                   f"one under another name: `synpref benchmarks add {src} --name {name} --as "
                                   f"{_distinct_name(src, dst.parent)}`")
    # everything is checked before the folder changes (as the file will be read there: its name gives RM-Bench's
    # domain and PPE's source), then the file lands in one rename: a refused file leaves nothing behind
    items, _ = _parse_rows(rows, lay, src, named=dst)
    others = []
    if dst.parent.exists():
        for f in sorted(p for p in dst.parent.iterdir() if p.name.lower().endswith(BENCHMARK_FILES) and p != dst):
            others += read_benchmark_file(f, name)[0]
    _check_unique_keys(others + items, name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{uuid.uuid4().hex}.partial"
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _distinct_name(src: Path, folder: Path) -> str:
    """A stored name for `src` that keeps the distinct part of its path, its parent folders (innermost first) after
    its own name, whose start RM-Bench's domain is read from: BoN_set/Harmlessness/S1.json -> S1_Harmlessness.json,
    then S1_BoN_set_Harmlessness.json; the first one free in `folder`."""
    ext = next(e for e in sorted(BENCHMARK_FILES, key=len, reverse=True) if src.name.lower().endswith(e))
    stem = src.name[: -len(ext)]
    parts = [p for p in src.resolve().parts[:-1] if p not in ("/", "")]
    for k in range(1, len(parts) + 1):
        cand = "_".join([stem, *parts[-k:]]) + ext
        if not (folder / cand).exists():
            return cand
    return f"{stem}_2{ext}"


def fetch_benchmark(name: str, root: Path, revision: str | None = None) -> list[Path]:
    """Download `name`'s published files from the Hugging Face Hub (hf://datasets/<repo>/<file>, through
    huggingface_hub: offline, it serves them from the local HF cache) and add them."""
    if name not in HUB:
        raise BenchmarkFormatError(f"no Hub location for {name!r} (known: {sorted(HUB)}; RMB is on GitHub: download "
                                   "it and use `synpref benchmarks add`)")
    from huggingface_hub import hf_hub_download  # here: only `benchmarks fetch` needs the Hub client

    out = []
    for repo, f in HUB[name]:
        local = hf_hub_download(repo_id=repo, filename=f, repo_type="dataset", revision=revision)
        # named after the repo: PPE's correctness source and RM-Bench's domain can come from the file name
        out.append(add_benchmark(Path(local), root, name, as_name=repo.split("/")[1] + Path(f).suffix))
    return out
