"""The data layer: the training-data format (`examples`: queries, positives, hard negatives from
JSONL, BEIR directories and ``datasets`` objects) and reading JSONL texts with their ids
(`texts`). Shared by training, mining and evaluation; imports nothing else of retriever."""
