"""shardmerge: streaming, bounded-memory SLERP merging of sharded safetensors checkpoints.

Importing the package is cheap (no torch); ``SLERPModelMerger`` and ``slerp`` load torch on
first use so ``shardmerge --help`` and ``shardmerge validate`` start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["SLERPModelMerger", "__version__", "slerp"]

if TYPE_CHECKING:
    from shardmerge.merger import SLERPModelMerger
    from shardmerge.slerp import slerp


def __getattr__(name: str) -> Any:
    if name == "SLERPModelMerger":
        from shardmerge.merger import SLERPModelMerger

        return SLERPModelMerger
    if name == "slerp":
        from shardmerge.slerp import slerp

        return slerp
    raise AttributeError(f"module 'shardmerge' has no attribute {name!r}")
