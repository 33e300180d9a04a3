"""Review assets under Dagster: a rerun leaves an open queue alone; the next batch comes once it is reviewed."""

import dagster as dg
import polars as pl


def test_raw_shard_range_in_one_run_then_queue_batches(synpref_home):
    from assets.annotate import llm_annotations
    from assets.ingest import benchmarks, raw_pairs, raw_shards, synthetic_landing
    from assets.review import human_verified_seed, review_queue, simulated_review
    from definitions import defs
    from pipelines.synth.generator import synthetic_shard_keys
    from resources.lake import LakeResource
    from resources.llm import LLMResource

    def run(assets, config=None, tags=None):
        # project-made data: the simulated judge, chosen explicitly (the Definitions have no LLM by default)
        res = dg.materialize(assets, instance=inst, resources={**defs.resources, "llm": LLMResource(backend="simulated")},
                             run_config={"ops": config or {}}, tags=tags)
        assert res.success
        return res

    with dg.instance_for_test() as inst:
        run([synthetic_landing, benchmarks], {"synthetic_landing": {"config": {"n_pairs": 160, "n_shards": 2,
                                                                               "benchmark_pairs": 20}}})
        keys = synthetic_shard_keys(2)
        assert inst.get_dynamic_partitions(raw_shards.name) == keys  # the asset registered its own shards
        res = run([raw_pairs], tags={"dagster/asset_partition_range_start": keys[0],
                                     "dagster/asset_partition_range_end": keys[-1]})
        assert inst.get_materialized_partitions(raw_pairs.key) == set(keys)  # three partitions, one run
        checks = {c.check_name: c.passed for c in res.get_asset_check_evaluations()}
        assert checks == {"schema_matches": True, "pair_id_unique": True, "counts_reconcile": True}
        lake = LakeResource().lake()
        assert set(lake.lineage("raw_pairs")["partition"]) == set(keys)

        queue = {"review_queue": {"config": {"size": 30, "precheck": False, "overlap_frac": 1.0}}}  # all double-annotated
        run([llm_annotations])
        run([review_queue], queue)
        run([review_queue], queue)  # open queue: a rerun leaves it as it is
        q = lake.read("review_queue")
        assert set(q["queue_version"]) == {"q001"} and q.height == 30
        res = run([simulated_review], {"simulated_review": {"config": {"error_rate": 0.3}}})
        meta = res.asset_materializations_for_node("simulated_review")[0].metadata
        # per-annotator progress and agreement in the asset's metadata; disagreements settled by the (simulated) lead
        assert "sim-reviewer-0" in meta["progress_per_annotator"].value
        assert "q001" in meta["agreement_per_batch"].value and "kappa" in meta["agreement_per_batch"].value
        assert meta["adjudications"].value > 0 and meta["awaiting_adjudication"].value == 0
        run([simulated_review])  # nothing left to review: no verdict is written twice
        verdicts = lake.read("human_verdicts")
        assert verdicts.select("pair_id", "annotator").is_duplicated().sum() == 0
        seed_meta = run([human_verified_seed], {"human_verified_seed": {"config": {"min_agreement": 0.0}}}  # 30% errors
                        ).asset_materializations_for_node("human_verified_seed")[0].metadata
        assert seed_meta["adjudicated"].value == meta["adjudications"].value  # the lead's verdicts reach the seed
        assert "sim-lead" in seed_meta["progress_per_annotator"].value
        assert seed_meta["ledger_files_compacted"].value.endswith("-> 1")
        run([review_queue], queue)  # reviewed: the next batch, none of it seen before
        q = lake.read("review_queue")
        assert set(q["queue_version"]) == {"q001", "q002"}
        second = q.filter(pl.col("queue_version") == "q002")["pair_id"]
        assert second.len() > 0 and not second.is_in(verdicts["pair_id"].to_list()).any()
