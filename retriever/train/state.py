"""Where training is, saved in every checkpoint (an Accelerate custom state) as
``trainer_state.json``: the step, each source's position, the best evaluation so far, and what
a resumed run must keep (the chunk sizes, the data's fingerprint, whether it was sharded)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already trained on
    best_metric: float | None = None
    best_step: int | None = None
    evaluated_step: int | None = None  # the step of the last evaluation
    positions: list[list[int]] | None = None  # each source's [epoch, next batch]
    chunk_sizes: list[int] | None = None  # [gradient pass, no-grad pass], also when auto
    data_fingerprint: str | None = None  # of the training examples, checked on resume
    sharded: bool = False  # the checkpoints hold FSDP's whole state (train.sharding)
    evaluations_without_improvement: int = 0  # since the best one (eval.early_stopping_patience)
    # Every process's positions, when each reads its own shard of a streamed source.
    rank_positions: list[list[list[int]]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def start_positions(self, num_sources: int, rank: int = 0, world: int = 1) -> None:
        """A new run, or a checkpoint of one source: the first source where ``epoch`` and
        ``batch_in_epoch`` say, the others at their start; with every process's positions
        (shards of a stream), this process's."""
        if self.rank_positions is not None:
            if len(self.rank_positions) != world:
                raise ValueError(
                    f"--resume: the checkpoint was saved by {len(self.rank_positions)} processes, "
                    f"each reading its own shard of a stream; resume it with as many (not {world})"
                )
            self.positions = self.rank_positions[rank]
        if self.positions is None:
            first = [self.epoch, self.batch_in_epoch]
            self.positions = [first] + [[0, 0] for _ in range(num_sources - 1)]

    def summary(self, evaluations: list, final_loss: float | None, output_dir: Any) -> dict:
        """What ``train`` returns: steps, final loss, evaluations, the best step and metric."""
        return {
            "steps": self.step,
            "final_loss": final_loss,
            "evaluations": evaluations,
            "best_step": self.best_step,
            "best_metric": self.best_metric,
            "output_dir": str(output_dir),
        }

    def advance(self, positions: list[list[int]]) -> None:
        """After a step: each source's position past the batch it gave."""
        self.positions = positions
        self.epoch, self.batch_in_epoch = positions[0]
        self.step += 1
