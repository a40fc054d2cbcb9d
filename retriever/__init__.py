"""retriever: train dense retrieval embedding models with a near-infinite-batch contrastive loss."""

__version__ = "0.1.0"
