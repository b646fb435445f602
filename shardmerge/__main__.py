"""``python -m shardmerge``: the ``shardmerge`` command (also what torchrun's ``-m`` starts)."""

from shardmerge.cli import entry

if __name__ == "__main__":
    entry()
