"""Import/export for teams that label elsewhere: JSONL/CSV, and Label Studio's task/annotation JSON.

Export writes each queued pair with Candidate A/B in a seeded order (recorded as `order_shown`), so imported
choices un-swap exactly like verdicts made in our own app.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import polars as pl

from pipelines.review.ledger import VerdictIn


def _order(pair_id: str, seed: int) -> str:
    return "chosen_first" if random.Random(f"export|{seed}|{pair_id}").random() < 0.5 else "rejected_first"


def export_tasks(items: pl.DataFrame, path: str, fmt: str = "jsonl", seed: int = 0) -> int:
    """items: pair_id, history, chosen, rejected, task_category, guideline. fmt: jsonl | csv | labelstudio."""
    rows = []
    for r in items.iter_rows(named=True):
        order = _order(r["pair_id"], seed)
        a, b = (r["chosen"], r["rejected"]) if order == "chosen_first" else (r["rejected"], r["chosen"])
        conv = "\n".join(f"{m['role']}: {m['content']}" for m in r["history"])
        rows.append({"pair_id": r["pair_id"], "order_shown": order, "conversation": conv, "candidate_1": a,
                     "candidate_2": b, "task_category": r.get("task_category"), "guideline": r.get("guideline")})
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        p.write_text("".join(json.dumps(x) + "\n" for x in rows))
    elif fmt == "csv":
        with p.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["pair_id"])
            w.writeheader()
            w.writerows(rows)
    elif fmt == "labelstudio":
        # Label Studio tasks: {"data": {...}}; pair with a Pairwise/Choices labeling config on candidate_1/2.
        p.write_text(json.dumps([{"data": x} for x in rows], indent=1))
    else:
        raise ValueError(f"unknown format {fmt!r}: jsonl | csv | labelstudio")
    return len(rows)


_CHOICE = {"1": "1", "2": "2", "a": "1", "b": "2", "candidate_1": "1", "candidate_2": "2", "left": "1",
           "right": "2", "undecidable": "undecidable", "discard": "undecidable", "tie": "undecidable"}


def import_verdicts(path: str, fmt: str = "jsonl", default_annotator: str = "external") -> list[VerdictIn]:
    """Rows need pair_id, order_shown, choice (1/2/undecidable or A/B), optional annotator, note, seconds."""
    p = Path(path)
    out: list[VerdictIn] = []
    if fmt == "labelstudio":
        for task in json.loads(p.read_text()):
            data = task["data"]
            for ann in task.get("annotations", []):
                choice = None
                for res in ann.get("result", []):
                    val = res.get("value", {})
                    if "selected" in val:  # Pairwise tag: "left" / "right"
                        choice = val["selected"]
                    elif val.get("choices"):
                        choice = val["choices"][0]
                if choice is None:
                    continue
                who = str((ann.get("completed_by") or {}).get("email") if isinstance(ann.get("completed_by"), dict)
                          else ann.get("completed_by") or default_annotator)
                out.append(VerdictIn(pair_id=data["pair_id"], annotator=who, order_shown=data["order_shown"],
                                     choice=_CHOICE[str(choice).strip().lower()],
                                     seconds_spent=float(ann.get("lead_time") or 0.0)))
        return out
    rows = ([json.loads(x) for x in p.read_text().splitlines() if x.strip()] if fmt == "jsonl"
            else list(csv.DictReader(p.open())))
    for r in rows:
        out.append(VerdictIn(pair_id=r["pair_id"], annotator=r.get("annotator") or default_annotator,
                             order_shown=r["order_shown"], choice=_CHOICE[str(r["choice"]).strip().lower()],
                             note=r.get("note") or "", seconds_spent=float(r.get("seconds_spent") or 0.0)))
    return out
