"""Latent pre-storage: extract frozen-encoder outputs once, store them sharded, read them memory-mapped."""

from omnimoe.latents.extract import ExtractionError, extract
from omnimoe.latents.store import LatentStore, StoreError

__all__ = ["ExtractionError", "LatentStore", "StoreError", "extract"]
