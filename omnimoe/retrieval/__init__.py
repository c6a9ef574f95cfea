"""Real-time retrieval: stored target latents, projected once and indexed; queries run one encoder and the connector."""

from omnimoe.retrieval.index import KINDS, IndexMismatch, IndexSpec, VectorIndex, faiss_available
from omnimoe.retrieval.retriever import DEFAULT_METHOD, Hit, QueryError, Retriever

__all__ = [
    "DEFAULT_METHOD",
    "KINDS",
    "Hit",
    "IndexMismatch",
    "IndexSpec",
    "QueryError",
    "Retriever",
    "VectorIndex",
    "faiss_available",
]
