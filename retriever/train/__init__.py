"""Training: `retriever train` from a YAML config.

* `options` (the documented options, bounds as metadata), `config` (YAML and command line);
* `data` (per-epoch groups, batches without duplicate positives), `tokens` (the token cache),
  `batches` (chunks, collation), `loader` (one DataLoader for the run);
* `step` (the cached step), `chunk_sizes` (both passes' sizes, `auto`), `precision` (bf16
  weights with fp32 master weights);
* `run_directory` (checkpoints whole or absent, `--overwrite` that cannot destroy), `resume`,
  `checkpoints`;
* `builders` (accelerator, encoder, loss, miner, optimizer from the config), `evaluation`,
  `step_log`, `trainer` (the loop), `cli` (the command).
"""
