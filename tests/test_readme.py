"""The README's code blocks, run as a reader would paste them."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def _demo_commands() -> list[str]:
    """Every shell line of the README that runs shardmerge on the offline demo."""
    commands = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("shardmerge ", "python -m shardmerge ")) and "demo" in line:
                commands.append(line)
    return commands


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_blocks_run_as_they_stand(index, tmp_path, monkeypatch):
    # From the repository's root, as a reader of the README would (the demo models are in
    # recipes/), in a copy so that what a block writes lands in tmp_path.
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    exec(compile(_blocks("python")[index], f"README.md python block {index}", "exec"), {})


def test_demo_shell_commands_run_in_order(tmp_path):
    commands = _demo_commands()
    assert len(commands) >= 2, commands  # the quickstart's run and verify at least
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "python":
            argv[0] = sys.executable
        else:  # the console script, or the same program where it is not installed
            exe = Path(sys.executable).with_name("shardmerge")
            argv[:1] = [str(exe)] if exe.exists() else [sys.executable, "-m", "shardmerge"]
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env)
        assert done.returncode == 0, (command, done.stderr)
    assert (tmp_path / "merged-demo" / "model.safetensors.index.json").is_file()


def test_python_dash_m_shardmerge_is_the_command():
    done = subprocess.run(
        [sys.executable, "-m", "shardmerge", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("shardmerge ")
