"""Curation quality on real pairs with injected label noise, through the product's own functions: does Stage 2 find
the flips, and does it pay off?

On the hh-rlhf pairs in ../shared, a fraction `--flip` of the labels is swapped (the truth kept aside as
`synth_truth`, which only the simulated judges read), then the same calls the Dagster assets make:
  ingest_shard -> a human seed (the clean pairs, in train / gold_val / gold_test) -> the gold RM (MiniLM,
  trained and registered by MlflowRewardModels) -> annotate_pool + embed_pool (Stage 1's pool) -> seed judgments
  -> run_stage1 (error-driven retrieval, simulated judges with accuracy --judge-acc) -> run_stage2 (in-process
  engine) -> curated_pairs / recycled_pairs.
Reports flip-detection precision/recall and kept-set label precision of Stage 2, and the held-out accuracy
(gold_test of the seed plus a held-out clean set) of MiniLM RMs trained on the raw (noisy) Stage-2 pool, the
curated pool and the clean pool, all in one run.

    python benchmarks/curation.py --flip 0.3
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flip", type=float, default=0.3)
    ap.add_argument("--seed-size", type=int, default=500, help="clean human-verified pairs (all three splits)")
    ap.add_argument("--test", type=int, default=400, help="extra clean held-out pairs, never ingested")
    ap.add_argument("--stage1-fraction", type=float, default=0.35)
    ap.add_argument("--judge-acc", type=float, default=0.85)
    ap.add_argument("--margin", type=float, default=0.1)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--iterations", type=int, default=1)
    a = ap.parse_args()
    import polars as pl
    import pyarrow as pa

    from benchmarks.rm_train import HH
    from pipelines.annotate.backends import SimulatedBackend
    from pipelines.annotate.prompts import load_prompt
    from pipelines.annotate.attributes import attributes
    from pipelines.compute import InProcessEngine
    from pipelines.curate.judge import JudgeSetup, exemplar_index, judge_with_exemplars
    from pipelines.curate.prepare import annotate_pool, embed_pool
    from pipelines.curate.stage1 import Stage1Config, as_stored, run_stage1
    from pipelines.curate.stage2 import Stage2Config, Stage2Inputs, run_stage2, training_mix
    from pipelines.ingest.run import ingest_shard
    from pipelines.lake import Lake
    from pipelines.embed import Embedder
    from pipelines.pool import pool_stage_expr, truth_categories
    from pipelines.review.seed import gold_split
    from pipelines.rm.model import load_reward_model
    from pipelines.rm.registry import best_of, latest, ref_of
    from pipelines.rm.score import score_rows
    from pipelines.rm.service import MlflowRewardModels
    from pipelines.rm.train import TrainConfig, train_reward_model
    from pipelines.settings import minilm_path
    from pipelines.tables import CURATED, JUDGMENTS, RECYCLED, SEED, SYNTH_TRUTH

    if not HH.exists():
        raise SystemExit(f"needs the real pairs at {HH}")
    work = Path(tempfile.mkdtemp(prefix="curation-"))
    lake = Lake(str(work / "lake"))
    # the real pairs, once, to know them by id; then a flipped copy of the pool lands as its own shard
    ingest_shard(Lake(str(work / "probe")), str(HH), source="hh", shard="hh/clean", run_id="probe")
    rows = Lake(str(work / "probe")).read("raw_pairs").to_dicts()
    rng = random.Random(0)
    rng.shuffle(rows)
    test, seed_rows, rest = rows[:a.test], rows[a.test:a.test + a.seed_size], rows[a.test + a.seed_size:]
    landing = work / "landing.jsonl"
    truth = []
    with landing.open("w") as fh:
        for r in seed_rows + rest:
            flip = r in rest and rng.random() < a.flip
            c, j = (r["rejected"], r["chosen"]) if flip else (r["chosen"], r["rejected"])
            fh.write(json.dumps({"prompt": r["history"], "chosen": c, "rejected": j}) + "\n")
    ingest_shard(lake, str(landing), source="hh", shard="hh/landing", run_id="bench")
    raw = lake.read("raw_pairs")
    seed_keys = {(json.dumps(r["history"]), r["chosen"]) for r in seed_rows}
    clean_of = {json.dumps(r["history"]) + "\x00" + r["chosen"] + "\x00" + r["rejected"]: True for r in rows}
    for r in raw.iter_rows(named=True):
        key = json.dumps(r["history"]) + "\x00" + r["chosen"] + "\x00" + r["rejected"]
        truth.append({"pair_id": r["pair_id"], "label_correct": key in clean_of, "category": "other"})
    lake.overwrite(SYNTH_TRUTH, pa.Table.from_pylist(truth))
    # the human seed: the clean pairs, wherever their hash puts them in the pool split (humans verified them)
    is_seed = pl.Series([(json.dumps(h), c) in seed_keys for h, c in zip(raw["history"].to_list(), raw["chosen"])])
    seed = raw.filter(is_seed).select("pair_id", "history", "chosen", "rejected").with_columns(
        label_origin=pl.lit("simulated"), label_flipped=pl.lit(False),
        split=pl.col("pair_id").map_elements(lambda p: gold_split(p, 0.2, 0.2), return_dtype=pl.String))
    # Stage 1's pool gets attributes and embeddings, as llm_annotations / pair_embeddings do
    annotator = SimulatedBackend(name="annotator")
    annotate_pool(lake, annotator, load_prompt("attributes_v1"), "bench", stage1_fraction=a.stage1_fraction,
                  categories=lambda p: truth_categories(lake, p))
    attrs = attributes(lake, seed).collect()
    seed = seed.join(attrs, on="pair_id", how="left").with_columns(task_category=pl.col("task_category").fill_null("other"))
    lake.overwrite(SEED, seed.to_arrow())
    emb = Embedder(minilm_path(), 96)
    embed_pool(lake, emb.encode, emb.name, stage1_fraction=1.0)  # the seed is embedded too (exemplars)
    judges = [SimulatedBackend(name="judge-a", accuracy=a.judge_acc),
              SimulatedBackend(name="judge-b", accuracy=a.judge_acc - 0.05)]
    judging = JudgeSetup(judges=judges, prompt=load_prompt("judge_v1"), samples=3)
    judge_with_exemplars(lake, as_stored(seed), judging, exemplar_index(lake, seed.filter(pl.col("split") != "gold_test")),
                         run_id="bench", context="seed", table=JUDGMENTS)
    cfg = TrainConfig(lr=5e-5, batch_size=16, epochs=a.epochs, max_len=a.max_len, eval_every=20, progress=False)

    def trainer(backbone, tr, va, c, out, log):
        return train_reward_model(load_reward_model(backbone, seed=0), tr, va, c, out, log=log)

    rms = MlflowRewardModels(lake=lake, tracking_uri=f"sqlite:///{work}/mlflow.db", experiment="bench",
                             artifact_root=None, home=work, backbone=minilm_path(), cfg=cfg, train_fn=trainer,
                             load_fn=lambda p: load_reward_model(p))
    splits = {s: seed.filter(pl.col("split") == s) for s in ("train", "gold_val", "gold_test")}
    gold = rms.train(name="synpref-gold-rm", role="gold", train=splits["train"], val=splits["gold_val"])
    run_stage1(lake, Stage1Config(iterations=a.iterations, stage1_fraction=a.stage1_fraction, label_origin="simulated"),
               rms, judging, run_id="bench")
    best = best_of(lake, "stage1")
    inputs = Stage2Inputs(best=ref_of(best, rms.tracking_uri, work / "cache"),
                          gold=ref_of(latest(lake, role="gold"), rms.tracking_uri, work / "cache"),
                          annotator=annotator, attributes_prompt=load_prompt("attributes_v1"), judging=judging)
    rep = run_stage2(lake, Stage2Config(confidence_margin=a.margin, unit_rows=50_000,
                                        stage1_fraction=a.stage1_fraction, embed_model=minilm_path()),
                     inputs, InProcessEngine(max_len=a.max_len), run_id="bench")
    t = lake.read(SYNTH_TRUTH).select("pair_id", "label_correct")
    s2 = lake.read(CURATED).filter(pl.col("stage") == "stage2").join(t, on="pair_id")
    rec = lake.read(RECYCLED).join(t, on="pair_id")
    pool = raw.filter(pool_stage_expr(a.stage1_fraction) == "stage2").join(seed.select("pair_id"), on="pair_id",
                                                                           how="anti").join(t, on="pair_id")
    n_wrong = int((~pool["label_correct"]).sum())
    caught = int((~rec["label_correct"]).sum())
    held_out = pl.concat([pl.DataFrame(test).select("pair_id", "history", "chosen", "rejected"),
                          splits["gold_test"].select("pair_id", "history", "chosen", "rejected")])

    def acc(path: str) -> float:
        s, _ = score_rows(load_reward_model(path), held_out.to_dicts(), "t", max_len=a.max_len)
        return float((s["margin"] > 0).mean())

    def fit(train_rows, name: str) -> str:
        if isinstance(train_rows, pl.DataFrame):
            train_rows = train_rows.select("pair_id", "history", "chosen", "rejected").to_dicts()
        return train_reward_model(load_reward_model(minilm_path(), seed=0), train_rows, [], cfg,
                                  str(work / name)).best_dir

    clean_pool = pool.with_columns(chosen=pl.when(pl.col("label_correct")).then("chosen").otherwise("rejected"),
                                   rejected=pl.when(pl.col("label_correct")).then("rejected").otherwise("chosen"))
    from pipelines.rm.store import build_token_store

    curated_train = build_token_store(training_mix(lake, work / "mixes")[0], minilm_path(), work / "token_store",
                                      max_len=a.max_len).store  # what the family assets train on
    print(f"data: hh-rlhf harmless-base test (real); Stage-2 pool {pool.height} pairs with {n_wrong} flipped "
          f"({100 * a.flip:.0f}% target); seed {seed.height} ({', '.join(f'{k} {v.height}' for k, v in splits.items())}); "
          f"held-out {held_out.height}; judges simulated acc {a.judge_acc:.2f}/{a.judge_acc - 0.05:.2f}")
    print(f"gold RM gold_val acc {gold.val_accuracy:.3f} ({gold.rm_version}); best Stage-1 RM {best['rm_version']} "
          f"gold_val acc {best['val_accuracy']:.3f}; Stage 2 judged {rep.judged} pairs, {100 * rep.skipped_annotation_share:.0f}% "
          f"needed no LLM call; counts reconcile: {rep.reconciles}")
    print(f"kept {s2.height}, recycled {rec.height}: kept-set label precision {s2['label_correct'].mean():.3f} "
          f"(pool {1 - n_wrong / max(pool.height, 1):.3f}); flip detection precision {caught / max(rec.height, 1):.3f}, "
          f"recall {caught / max(n_wrong, 1):.3f}")
    a_raw, a_cur, a_clean = acc(fit(pool, "raw")), acc(fit(curated_train, "cur")), acc(fit(clean_pool, "clean"))
    print(f"held-out accuracy of MiniLM RMs: raw pool {a_raw:.3f} | curated mix {a_cur:.3f} | clean pool {a_clean:.3f} "
          f"(curated - clean = {100 * (a_cur - a_clean):+.1f} pt)")


if __name__ == "__main__":
    main()
