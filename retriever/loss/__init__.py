"""Contrastive losses: InfoNCE computed tile by tile (PyTorch or fused Triton kernels)."""

from retriever.loss.functional import contrastive_loss
from retriever.loss.infcl_loss import InfCLLoss
from retriever.loss.infonce import InfoNCELoss

__all__ = ["contrastive_loss", "InfoNCELoss", "InfCLLoss"]
