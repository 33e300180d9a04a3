"""LakeResource: the Delta lake root (local folder or s3://bucket/prefix) and the landing prefix."""

import fsspec
import dagster as dg
from pydantic import Field

from pipelines.ingest.readers import fs_options, file_kind
from pipelines.lake import Lake
from pipelines.settings import default_landing_root, default_lake_root


class LakeResource(dg.ConfigurableResource):
    """Every table lives under `root`. S3 credentials/endpoint come from the AWS_* environment, never config.

    Empty fields resolve at use time from SYNPREF_LAKE_ROOT / SYNPREF_LANDING_ROOT / SYNPREF_HOME.
    """

    root: str = Field(default="", description="Lake root: a local folder or s3://bucket/prefix "
                                              "(default <SYNPREF_HOME>/lake)")
    landing_root: str = Field(default="", description="Where raw shards land: <landing_root>/<source>/<file>; "
                                                      "local or s3:// (default <SYNPREF_HOME>/landing)")

    @property
    def lake_root(self) -> str:
        return self.root or default_lake_root()

    @property
    def landing(self) -> str:
        return (self.landing_root or default_landing_root()).rstrip("/")

    def lake(self) -> Lake:
        return Lake(self.lake_root)

    def landing_path(self, partition_key: str) -> str:
        return f"{self.landing}/{partition_key}"

    def list_landing(self) -> list[str]:
        """Relative paths <source>/<file> of every readable shard under the landing root."""
        root = self.landing
        fs, _, (base,) = fsspec.get_fs_token_paths(root, storage_options=fs_options(root))
        if not fs.exists(base):
            return []
        out = []
        for p in fs.find(base):
            rel = p[len(base):].lstrip("/")
            if "/" not in rel:
                continue
            try:
                file_kind(rel)
            except ValueError:
                continue
            out.append(rel)
        return sorted(out)
