"""Every Delta table of the lake, by name: one constant each, so a reader finds who writes and who reads a table
with one search (docs/data-model.md has their keys and columns)."""

# ingest
RAW = "raw_pairs"
QUARANTINE = "quarantine"
DUPLICATES = "duplicates"
BENCHMARK_ITEMS = "benchmark_pairs"
BENCHMARK_PROMPTS = "benchmark_prompts"
SYNTH_TRUTH = "synth_truth"  # project-made data only: whether each shipped label is right
# annotation: one table per writer (the pools are disjoint, so no cache hit is lost by keeping them apart)
ANNOTATIONS = "llm_annotations"  # attributes of Stage 1's pool
JUDGMENTS = "llm_judgments"  # the ensemble's verdicts on the human-verified seed
PRECHECKS = "llm_prechecks"
EMBEDDINGS = "pair_embeddings"  # Stage 1's pool (retrieval, exemplars)
STAGE1_JUDGMENTS = "stage1_judgments"  # verdicts on the pairs Stage 1 retrieved
STAGE2_ANNOTATIONS = "stage2_annotations"  # attributes of the pairs Stage 2's RMs were unsure of
STAGE2_JUDGMENTS = "stage2_judgments"  # verdicts on those pairs
# review
QUEUE = "review_queue"
VERDICTS = "human_verdicts"
SEED = "human_verified_seed"
# reward models
RM_REGISTRY = "rm_registry"
RM_DATA = "rm_data_manifest"  # which pair ids each RM trained on and was selected on
SCORES = "rm_scores"
# curation
SILVER = "silver_pairs"
STAGE1_METRICS = "stage1_metrics"
CURATED = "curated_pairs"
RECYCLED = "recycled_pairs"
STAGE2_UNITS = "stage2_units"  # one row per committed Stage-2 work unit (resume ledger + per-unit counts)
# evaluation
RM_EVALUATION = "rm_evaluation"
RM_REWARDS = "rm_item_rewards"  # one reward per (rm_version, benchmark, item, response)
# bookkeeping
LINEAGE = "lineage"
