"""Manifests (JSONL, one sample a line) and adapters that write them."""

from omnimoe.data.manifest import ManifestError, read_manifest, validate_manifest, write_manifest

__all__ = ["ManifestError", "read_manifest", "validate_manifest", "write_manifest"]
