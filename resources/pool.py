"""PoolResource: how the raw pairs divide into Stage 1's pool and Stage 2's, one setting every curation asset reads
(so the UI shows it and it enters each run's recorded config)."""

import dagster as dg
from pydantic import Field


class PoolResource(dg.ConfigurableResource):
    stage1_fraction: float = Field(
        default=0.4, description="Share of raw pairs (by a stable hash of pair_id) in Stage 1's pool D_un (review "
                                 "queue, error-driven retrieval); the rest is Stage 2's D_wild. The paper draws "
                                 "Stage 1 from ~1M pairs and Stage 2 from tens of millions: at that scale set ~0.03.")
