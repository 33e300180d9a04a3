"""Imports flow one way (issue 30): checked statically from the AST, so no project module is executed.

Every import statement counts, at module level or inside a function: a function-level import may keep a heavy
library out of start-up, never hide a circle between project modules.

The layers of ``pipelines/`` (a top-level module, or a package), lowest first; a module imports only from its own
layer or from one listed before it (two layers on one line may not import each other):

    settings, chat                   where state lives; chat turns (no project import)
    schema                           the pair, its ids, table schemas, quarantine reason codes
    tables                           every table name
    lake                             Delta tables on a filesystem or S3
    ingest                           raw records -> raw_pairs (checks, dedup, decontamination)
    pool                             Stage-1/Stage-2 pools of raw_pairs: bounded reads, work units, quarantine
    annotate                         LLM backends, prompts, validation, the cache, attributes, judging, pre-checks
    rm                               the Bradley-Terry reward model: data, training, scoring, registry
    embed                            the sentence embedder (compute runs it; curate stores and searches vectors)
    compute                          where RM scoring and embedding run (in this process or on Ray)
    evaluate                         benchmark readers, the harness, judge gates, the report
    curate                           Stage 1's pool prepared, Stage 1, judging with exemplars, Stage 2
    review                           the human review queue, ledger, app and seed
    synth, serve                     project-made data and the simulated reviewer; the reward server

Why this order: ``pool`` reads only what ingest wrote (``lake``, ``schema``), so it sits just above ingest and
below everything that draws from a pool; it imports no annotate module (attribute lookups live in
``annotate.attributes``; annotating a pool unit by unit is curate's: ``curate.prepare.annotate_pool``). ``embed`` is
below ``compute`` because compute runs the Embedder. ``Reason`` and ``item_pair_ids`` live in ``schema`` because
ingest needs them as much as the later stages and evaluate do.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "assets", "resources", "jobs")

LAYERS: list[tuple[str, ...]] = [
    ("settings", "chat"),
    ("schema",),
    ("tables",),
    ("lake",),
    ("ingest",),
    ("pool",),
    ("annotate",),
    ("rm",),
    ("embed",),
    ("compute",),
    ("evaluate",),
    ("curate",),
    ("review",),
    ("synth", "serve"),
]
RANK = {layer: i for i, group in enumerate(LAYERS) for layer in group}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}
    found["definitions"] = ROOT / "definitions.py"
    return found


def _imports(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(project modules imported, top-level names of every module imported) by one file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    tops: set[str] = set()

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in known:  # `import pipelines.rm.train.x` -> the longest project module
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                tops.add(alias.name.split(".")[0])
                if (hit := resolve(alias.name)) is not None:
                    targets.add(hit)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            tops.add(source.split(".")[0])
            for alias in node.names:  # `from pkg import mod` imports the submodule mod
                sub = f"{source}.{alias.name}"
                hit = sub if sub in known else resolve(source)
                if hit is not None:
                    targets.add(hit)
    targets.discard(name)
    return targets, tops


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    tops: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name], tops[name] = _imports(name, path, known)
    return graph, tops


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def _layer(module: str) -> str:
    return module.split(".")[1]


def test_no_import_circle_among_project_modules():
    graph, _ = _graph()
    cycles = _cycles(graph)
    detail = [" <-> ".join(c) + "\n      " + "; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c)
              for c in cycles]
    assert not cycles, "import circles (every import statement counts):\n  " + "\n  ".join(detail)


def test_pipelines_layers_import_downwards_only():
    graph, _ = _graph()
    bad = []
    for src, targets in sorted(graph.items()):
        if not src.startswith("pipelines."):
            continue
        for dst in sorted(targets):
            if not dst.startswith("pipelines.") or _layer(src) == _layer(dst):
                continue
            assert _layer(src) in RANK and _layer(dst) in RANK, f"undeclared layer in {src} -> {dst}: add it to LAYERS"
            if RANK[dst.split(".")[1]] >= RANK[_layer(src)]:
                bad.append(f"{src} -> {dst}")
    assert not bad, "imports against the layer order (" + " < ".join("/".join(g) for g in LAYERS) + "):\n  " + \
        "\n  ".join(bad)


def test_pipelines_do_not_import_dagster():
    _, tops = _graph()
    bad = sorted(name for name, used in tops.items() if name.startswith("pipelines") and "dagster" in used)
    assert not bad, f"pipelines/ is domain code, free of Dagster: {bad}"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The analysis itself: an import inside a function and a relative one are edges; a circle is found."""
    src = tmp_path / "a.py"
    src.write_text("def f():\n    from .b import g\n    import c.d\n")
    targets, _ = _imports("p.a", src, {"p.a", "p.b", "c", "c.d"})
    assert targets == {"p.b", "c.d"}
    assert _cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]


MAX_FUNCTION_LINES = 75  # the aim is what a reader takes in at once (~60); past this a function hides a knot


def _long_functions(path: Path, limit: int) -> list[str]:
    tree = ast.parse(path.read_text())
    return [f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{n.lineno} {n.name} "
            f"({n.end_lineno - n.lineno + 1} lines)"
            for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > limit]


def test_no_function_longer_than_a_reader_takes_in():
    """Long functions with closures that carry state (the review app's 235-line create_app, a 180-line training
    loop) become small classes; this keeps them so (decorators and docstrings count)."""
    long = [f for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) for f in _long_functions(p, MAX_FUNCTION_LINES)]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n  " + "\n  ".join(long)


def test_the_length_check_sees_nested_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def outer():\n    def inner():\n" + "        x = 1\n" * 80 + "    return inner\n")
    assert [f.split()[1] for f in _long_functions(src, 75)] == ["outer", "inner"]
