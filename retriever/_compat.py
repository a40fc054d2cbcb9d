"""Old import paths (before the model/ and train/ layers) keep working, with a warning that
names the new path: ``import retriever.modeling`` gives a module whose names come from their
new homes. Installed by ``retriever/__init__.py``; the package root holds no shim files."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from typing import Any

# old module -> the modules its names now live in (searched in order)
MOVED: dict[str, tuple[str, ...]] = {
    "retriever.modeling": (
        "retriever.model.encoder", "retriever.model.locate", "retriever.model.network",
        "retriever.model.settings", "retriever.model.st_dir",
    ),
    "retriever.layer_norm": ("retriever.model.layer_norm",),
    "retriever.sdpa": ("retriever.model.sdpa",),
    "retriever.arguments": ("retriever.train.config", "retriever.train.options"),
    "retriever.data": (
        "retriever.examples", "retriever.texts", "retriever.train.data", "retriever.train.batches",
    ),
    "retriever.step": ("retriever.train.step",),
    "retriever.precision": ("retriever.train.precision",),
    "retriever.trainer": (
        "retriever.train.trainer", "retriever.train.builders", "retriever.train.resume",
        "retriever.train.run_directory",
    ),
    "retriever.driver": ("retriever.train.cli",),
}  # fmt: skip


class _MovedModule(types.ModuleType):
    def __init__(self, name: str, targets: tuple[str, ...]) -> None:
        super().__init__(name, f"Moved: see {', '.join(targets)}.")
        self._targets = targets

    def __getattr__(self, attribute: str) -> Any:
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attribute):
                return getattr(module, attribute)
        raise AttributeError(
            f"{self.__name__}.{attribute} is gone; the module moved to {', '.join(self._targets)}"
        )


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec: Any) -> types.ModuleType:
        targets = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {targets[0]} (and its siblings); import from there",
            DeprecationWarning,
            stacklevel=3,
        )
        return _MovedModule(spec.name, targets)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install() -> None:
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())
