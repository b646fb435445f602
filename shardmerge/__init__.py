"""shardmerge: streaming, bounded-memory merging of sharded safetensors checkpoints.

Importing the package is cheap (no torch); ``SLERPModelMerger`` loads torch on first use so
``shardmerge --help`` and ``shardmerge validate`` start fast. The tensor-level function is
``shardmerge.slerp.slerp``.
"""

from __future__ import annotations

import gc
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["SLERPModelMerger", "__version__", "merge"]

if TYPE_CHECKING:
    from shardmerge.api import merge
    from shardmerge.merger import SLERPModelMerger


def import_torch() -> ModuleType:
    """``import torch`` with the cyclic garbage collector paused (the CLI's first torch import).

    Importing torch creates a few hundred thousand long-lived objects (modules, functions,
    classes), and the full collections they set off walk all of them again and again: 0.96-1.01 s
    with the collector, 0.85-0.92 s without, here. They are then frozen (``gc.freeze``), or the
    next full collection would walk them all once more (0.15 s, measured in the step after).
    """
    if "torch" in sys.modules:
        return sys.modules["torch"]
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
    return torch


def __getattr__(name: str) -> Any:
    if name == "merge":
        from shardmerge.api import merge

        return merge
    if name == "SLERPModelMerger":
        from shardmerge.merger import SLERPModelMerger

        return SLERPModelMerger
    raise AttributeError(f"module 'shardmerge' has no attribute {name!r}")
