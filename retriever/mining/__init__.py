"""Hard-negative mining (docs/mining.md).

* :mod:`retriever.mining.miner`: static mining (ranked lists, false-negative filters, rank band);
* :mod:`retriever.mining.files`: its inputs (BEIR, training JSONL) and output files;
* :mod:`retriever.mining.cli`: ``retriever mine``;
* :mod:`retriever.mining.dynamic`: re-mining during training (``mining.dynamic``);
* :mod:`retriever.mining.example_states`: its per-example state, read from a mined file.
"""
