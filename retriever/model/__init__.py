"""The model layer: a Hugging Face network as a text encoder.

* `encoder`: `Encoder` (tokenize, differentiable forward, encode, save);
* `settings`: `EncoderSettings` (pooling, normalisation, prefixes, max lengths: one object);
* `locate`: `locate_model` (``pkg:``, local directories, the Hub), `ModelNotFoundError`;
* `st_dir`: sentence-transformers directories, read and written;
* `network`: pooling, dropout, max lengths against the model's positions;
* `decoder`: decoder LLMs (last-token pooling, the EOS token), `lora`: LoRA adapters (peft);
* `fingerprint`: hashes of tokenizers and encoders (cache keys);
* `layer_norm` (Triton kernels, imported only when used) and `sdpa` (attention backends);
* `packed` and `varlen`: padding-free token streams and their attention; `compiled`:
  torch.compile of the layers;
* `fused`: the fused layer kernels swapped into BERT-family networks (`bias_gelu`,
  `residual_norm`: Triton, imported only when a kernel runs; `kernel_grid`: their grids) and
  Liger-Kernel's RMSNorm and SwiGLU swapped into decoder layers (when liger-kernel is installed).
"""

from retriever.model.encoder import Encoder
from retriever.model.locate import ModelNotFoundError, locate_model
from retriever.model.network import pool
from retriever.model.settings import EncoderSettings, SideSettings

__all__ = [
    "Encoder",
    "EncoderSettings",
    "ModelNotFoundError",
    "SideSettings",
    "locate_model",
    "pool",
]
