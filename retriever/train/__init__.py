"""Training: `retriever train` from a YAML config.

* `options` (the documented options, bounds as metadata), `config` (YAML and command line),
  `config_checks` (what single values cannot say);
* `sources` (data.train's sources and their shares of a step), `data` and `pairs` (per-epoch
  groups, batches without duplicate positives), `tokens` (the token cache), `batches` (chunks,
  collation), `loader` (one DataLoader for the run);
* `step` (the cached step), `chunk_sizes` (both passes' sizes, `auto`), `precision` (bf16
  weights with fp32 master weights), `sharding` (FSDP, ``training.fsdp``);
* `run_directory` (checkpoints whole or absent, `--overwrite` that cannot destroy), `resume`,
  `checkpoints`, `state` (what a checkpoint records of the loop);
* `builders` (accelerator, encoder, loss, miner, optimizer from the config), `evaluation`,
  `model_card`, `step_log`, `trainer` (the loop), `cli` (the command).
"""
