"""Contrastive losses computed tile by tile (PyTorch or fused Triton kernels), nothing of size
queries x candidates ever built, each one across processes through the ring (``group=``).

* InfoNCE: `contrastive_loss` (functional), `InfoNCELoss` (a module owning its temperature),
  `InfCLLoss` (for sentence-transformers);
* the other objectives (docs/objectives.md): `sigmoid_loss` / `SigmoidLoss` (SigLIP),
  `GlobalContrastiveLoss` (FastCLIP's FCCO), `MatryoshkaLoss` (nested prefixes of any of them),
  `distillation_loss` (KL to teacher scores over each query's group), `cosent_loss` (STS);
* underneath: `functional`, `inputs` (checks, which implementation), `tiled` (autograd),
  `torch_tiles` / `triton_tiles` / `sigmoid_tiles` / `sigmoid_triton` (the tiles; triton is
  imported only where a kernel runs), `tile_configs`, `triton_mode` (where kernels can run),
  `ring` and its transport, `scaled`;
* `gradcache`: the embedding cache (GradCache) that `InfCLLoss` and the trainer's step share.
"""

from retriever.loss.cosent import cosent_loss
from retriever.loss.distillation import distillation_loss
from retriever.loss.functional import contrastive_loss
from retriever.loss.gcl import GlobalContrastiveLoss
from retriever.loss.infcl_loss import InfCLLoss
from retriever.loss.infonce import InfoNCELoss
from retriever.loss.matryoshka import MatryoshkaLoss
from retriever.loss.sigmoid import SigmoidLoss, sigmoid_loss

__all__ = [
    "contrastive_loss",
    "InfoNCELoss",
    "InfCLLoss",
    "sigmoid_loss",
    "SigmoidLoss",
    "GlobalContrastiveLoss",
    "MatryoshkaLoss",
    "distillation_loss",
    "cosent_loss",
]
