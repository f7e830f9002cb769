"""Data: sample format, synthetic data set, importers, shard writer and the streaming loader (docs/data.md)."""
from defect_ds.data.shards import MissingManifestError, read_manifest

__all__ = ["MissingManifestError", "read_manifest"]
