"""The `retriever` command line: one subcommand per job, each defined next to the code it runs.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`; it is imported only
when its subcommand is used, so `retriever eval` never pays for importing the trainer.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("retriever.train.cli", "train an embedding model from a YAML config"),
    "eval": ("retriever.eval.cli", "evaluate a model on retrieval tasks (nDCG@10, recall, ...)"),
    "mine": ("retriever.mining.cli", "mine hard negatives with FAISS"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retriever", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Parse the command name first, then let its module declare its own arguments.
    known, _ = parser.parse_known_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    try:
        module = importlib.import_module(known._module)
    except ModuleNotFoundError as exc:
        if exc.name != known._module:
            raise
        parser.error(f"'{known.command}' is not available in this version of retriever")
    sub = argparse.ArgumentParser(
        prog=f"retriever {known.command}", description=SUBCOMMANDS[known.command][1]
    )
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(module.run(args) or 0)
