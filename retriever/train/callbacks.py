"""``transformers.TrainerCallback`` objects in a retriever run: ``Trainer(config,
callbacks=[...])`` calls them where the transformers Trainer would (train begin and end, step
begin and end, log, evaluate, save) with a ``transformers.TrainerState``, a
``transformers.TrainerControl`` and, as ``args``, the run's options under the names of
``transformers.TrainingArguments`` (``metric_for_best_model`` is eval.metric, higher is better),
so callbacks written for that Trainer work here too, ``EarlyStoppingCallback`` among them.

The loop honours ``control.should_training_stop`` (the run ends as if its last step were
reached: evaluated, saved, final/ written), ``should_evaluate`` and ``should_save``. With
several processes the main process's decision counts for every process, so that all stop at
the same step.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any


def training_arguments(config: Any, total_steps: int, evaluates: bool) -> types.SimpleNamespace:
    """The run's options as the ``args`` a TrainerCallback reads."""
    t, e = config.training, config.eval
    return types.SimpleNamespace(
        output_dir=t.output_dir,
        run_name=t.run_name,
        max_steps=total_steps,
        num_train_epochs=t.epochs,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.batch_size,
        train_batch_size=t.batch_size,
        seed=t.seed,
        logging_steps=t.logging_steps,
        eval_steps=e.steps,
        save_steps=t.save_steps,
        eval_strategy="steps" if evaluates else "no",
        save_strategy="steps" if t.save_checkpoints else "no",
        logging_strategy="steps",
        metric_for_best_model=e.metric,
        greater_is_better=True,
        load_best_model_at_end=True,  # the best model is kept in best/
        report_to=list(t.report_to),
        retriever_config=config,
    )


def checked_callbacks(callbacks: Any, evaluates: bool) -> list[Any]:
    """``Trainer(callbacks=...)`` as a list (one callback alone is taken too), checked before
    the run directory is touched; ``evaluates``: whether the run evaluates during training."""
    from transformers import EarlyStoppingCallback, TrainerCallback

    if callbacks is None:
        return []
    if not isinstance(callbacks, (list, tuple)):  # one callback alone
        callbacks = [callbacks]
    for callback in callbacks:
        if isinstance(callback, type) and issubclass(callback, TrainerCallback):
            raise TypeError(
                f"callbacks: {callback.__name__} is a class: pass an instance "
                f"({callback.__name__}(...))"
            )
        if not isinstance(callback, TrainerCallback):
            raise TypeError(
                "callbacks: expected transformers.TrainerCallback instances, got "
                f"{type(callback).__name__}"
            )
        if isinstance(callback, EarlyStoppingCallback) and not evaluates:
            raise ValueError(
                "callbacks: EarlyStoppingCallback stops on evaluations, and this run evaluates "
                "nothing during training: set eval.data or pass eval_datasets=..."
            )
    return list(callbacks)


class Callbacks:
    """The run's callbacks (`checked_callbacks`), with the TrainerState and TrainerControl
    they share."""

    def __init__(
        self, callbacks: Sequence[Any], args: types.SimpleNamespace, accelerator: Any
    ) -> None:
        from transformers import TrainerControl, TrainerState

        self.callbacks, self.args, self.accelerator = list(callbacks), args, accelerator
        self.state = TrainerState(
            max_steps=args.max_steps,
            logging_steps=args.logging_steps,
            train_batch_size=args.train_batch_size,
            is_local_process_zero=accelerator.is_local_main_process,
            is_world_process_zero=accelerator.is_main_process,
        )
        self.control = TrainerControl()

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def _call(self, event: str, **kwargs: Any) -> Any:
        for callback in self.callbacks:
            result = getattr(callback, event)(self.args, self.state, self.control, **kwargs)
            if result is not None:  # a callback may hand back a new control
                self.control = result
        return self.control

    def train_begin(self, step: int, model: Any) -> None:
        self.state.global_step = step
        self._call("on_train_begin", model=model)

    def step_begin(self) -> None:
        self._call("on_step_begin")

    def step_end(self, step: int, epoch: float) -> Any:
        """After an optimizer step: the control, its flags agreed on by every process."""
        self.state.global_step, self.state.epoch = step, epoch
        self.control.should_evaluate = self.control.should_save = False
        self._call("on_step_end")
        return self._agreed()

    def log(self, record: dict[str, Any]) -> None:
        logs = {k: v for k, v in record.items() if k != "step"}
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self._call("on_log", logs=logs)

    def evaluate(self, record: dict[str, Any], best_metric: float | None) -> Any:
        """After an evaluation: ``metrics`` under transformers' ``eval_`` names; the state's
        best metric is the one before this evaluation (as callbacks expect), then this run's."""
        metrics = {f"eval_{k}": v for k, v in record.items() if k != "step"}
        self.state.log_history.append({**metrics, "step": self.state.global_step})
        self._call("on_evaluate", metrics=metrics)
        self.state.best_metric = best_metric
        return self._agreed()

    def save(self) -> None:
        self._call("on_save")

    def train_end(self, model: Any) -> None:
        self._call("on_train_end", model=model)

    def _agreed(self) -> Any:
        """Every process acts on the main process's flags (a stop on one rank alone would
        leave the others waiting in the next step's collectives)."""
        acc, c = self.accelerator, self.control
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            flags = [(c.should_training_stop, c.should_evaluate, c.should_save)]
            ((c.should_training_stop, c.should_evaluate, c.should_save),) = broadcast_object_list(
                flags
            )
        return c
