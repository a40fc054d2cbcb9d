"""retriever: train dense retrieval embedding models with a near-infinite-batch contrastive loss.

Layers, each importing only those below it:

* leaves: `texts` (reading JSONL, text ids), `fileio` (atomic writes, hashes), `gradcache`
  (the embedding cache), `triton_mode` (where kernels can run);
* `loss`: InfoNCE tile by tile (`contrastive_loss`, `InfoNCELoss`, `InfCLLoss`), the ring;
* `model`: `Encoder` and its `EncoderSettings`, sentence-transformers directories;
* `examples`: the training-data format (shared by training and mining);
* `eval`: retrieval tasks, encode-and-search (shared with mining), metrics, `retriever eval`;
* `mining`: hard negatives, static and dynamic, `retriever mine`;
* `train`: options and config, data, token cache, loader, the cached step, the run directory,
  the trainer, `retriever train`.

`cli` dispatches the subcommands. Old module paths (`retriever.modeling`, `retriever.data`, ...)
still import, with a DeprecationWarning naming the new one (`_compat`).
"""

from retriever._compat import install as _install_compat

__version__ = "0.1.0"
_install_compat()
