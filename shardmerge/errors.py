"""Exceptions with the exit codes the CLI maps them to."""

from __future__ import annotations


class ShardmergeError(Exception):
    """A failure shardmerge reports as one clear message (exit code 1: runtime failure)."""

    exit_code = 1


class InputError(ShardmergeError):
    """Bad recipe, usage, checkpoint or output location (exit code 2)."""

    exit_code = 2


class RecipeError(InputError):
    """Every problem found in a recipe, each prefixed with its location."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = f"{where}{self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{where}{len(self.problems)} problems in the recipe:\n{lines}"
        super().__init__(message)


class CheckpointError(InputError):
    """A checkpoint that cannot be read or does not match the other model."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{len(self.problems)} problems with the checkpoints:\n{lines}"
        super().__init__(message)


class OutputError(InputError):
    """An output location that cannot be used."""


class NonFiniteInputError(CheckpointError):
    """An input tensor holds NaN or Inf (bad input: the merge would spread it)."""

    def __init__(self, tensor: str, model_key: str) -> None:
        self.tensor, self.model_key = tensor, model_key
        super().__init__(
            f"tensor {tensor!r} in model {model_key.upper()} contains NaN or Inf values"
        )
