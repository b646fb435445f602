"""shardmerge: streaming, bounded-memory SLERP merging of sharded safetensors checkpoints.

Importing the package is cheap (no torch); ``SLERPModelMerger`` loads torch on first use so
``shardmerge --help`` and ``shardmerge validate`` start fast. The tensor-level function is
``shardmerge.slerp.slerp``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["SLERPModelMerger", "__version__"]

if TYPE_CHECKING:
    from shardmerge.merger import SLERPModelMerger


def __getattr__(name: str) -> Any:
    if name == "SLERPModelMerger":
        from shardmerge.merger import SLERPModelMerger

        return SLERPModelMerger
    raise AttributeError(f"module 'shardmerge' has no attribute {name!r}")
