"""``retriever train CONFIG.yaml``: train an embedding model from a YAML config.

    retriever train configs/scifact-minilm.yaml
    retriever train configs/scifact-minilm.yaml --max-steps 50 --batch-size 128
    retriever train configs/scifact-minilm.yaml --training.learning_rate 1e-4
    accelerate launch -m retriever train configs/pairs-minilm-bigbatch.yaml   # several GPUs

Every option of the config can be given on the command line as ``--section.option VALUE``; see
``retriever train --help`` and docs/training.md.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from retriever.train.config import ConfigError, add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file (see configs/)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue the run in training.output_dir from its latest checkpoint (or from "
        "CHECKPOINT, a checkpoints/step-N directory)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in training.output_dir (its config, checkpoints, models "
        "and logs); the old run is kept aside until the new one saves its first checkpoint, "
        "and put back if the new one fails before that",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective config (file + command line) and exit",
    )
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("retriever").setLevel(logging.INFO)
    from retriever.data.examples import DataError
    from retriever.fileio import WriteFailed, write_failure_reason
    from retriever.train.run_directory import RunError

    try:
        config = config_from_args(args)
        if args.print_config:
            sys.stdout.write(config.to_yaml())
            return 0
        from retriever.train.trainer import train

        train(config, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, DataError, RunError, WriteFailed) as exc:
        print(f"retriever train: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(
            f"retriever train: error: {exc.filename or 'a file'}: {write_failure_reason(exc)}; "
            "the run directory holds its newest complete checkpoint (free some space, then "
            "continue with --resume)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(
            "retriever train: interrupted. The run directory holds its newest complete "
            "checkpoint (continue with --resume); if this run had saved none, it is as it was "
            "before this start",
            file=sys.stderr,
        )
        return 130
    return 0
