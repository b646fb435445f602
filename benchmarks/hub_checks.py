"""Cost of issue 18's Hub safeguards: the pre-push checks, and sha256 verification per GB.

    python benchmarks/hub_checks.py checks --repeats 20      # on the loopback fake Hub
    python benchmarks/hub_checks.py refused --repeats 5      # a whole `run` refused up front
    python benchmarks/hub_checks.py sha256 --size-gb 1 --repeats 5

``checks`` times ``hub.check_push_target`` (token, whoami, repo info) against
``tests/fakehub.py`` on 127.0.0.1, for a new and for an existing target repo, in-process with
huggingface_hub already imported. ``refused`` times the whole ``shardmerge run ... --push-to-hub``
process refused for a read-only token (start-up and imports included). ``sha256`` writes a file of random bytes and times the same
function that checks each downloaded shard (``hub._sha256_of``), page cache warm after the first
run; the first (cold) run is reported apart.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_checks(repeats: int) -> None:
    with tempfile.TemporaryDirectory() as home:
        os.environ.update(
            HF_HOME=home,
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_XET="1",
            HF_TOKEN="hf_fake",
        )
        from tests.fakehub import FakeHub

        with FakeHub() as fake:
            from huggingface_hub import constants

            constants.ENDPOINT = fake.url  # read at import: point this process at the fake
            from shardmerge import hub

            fake.add_repo("me/existing", {"README.md": b"x"})
            for target in ("me/new", "me/existing"):
                hub.check_push_target(target, inputs=["org/a", "org/b"], private=False)  # warm
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    hub.check_push_target(target, inputs=["org/a", "org/b"], private=False)
                    times.append(time.perf_counter() - start)
                print(
                    f"check_push_target({target}): median {statistics.median(times) * 1e3:.1f} ms, "
                    f"min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f} ms over {repeats} "
                    f"runs; requests per check: {len(fake.log) // (repeats + 1)}"
                )
                fake.log.clear()


def time_refused(repeats: int) -> None:
    import subprocess

    from tests.fakehub import READ_TOKEN, FakeHub

    with tempfile.TemporaryDirectory() as home, FakeHub() as fake:
        recipe = Path(home) / "recipe.yaml"
        recipe.write_text("models:\n  a: org/a\n  b: org/b\nt: 0.5\n")
        env = {**os.environ, "HF_HOME": home, "HF_ENDPOINT": fake.url, "HF_TOKEN": READ_TOKEN}
        env["HF_HUB_DISABLE_TELEMETRY"] = "1"
        command = [sys.executable, "-m", "shardmerge.cli", "run", str(recipe)]
        command += ["--out", str(Path(home) / "out"), "--push-to-hub", "me/merged"]
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            times.append(time.perf_counter() - start)
        print(f"exit {done.returncode}: {done.stderr.strip()}")
        print(
            f"refused run: median {statistics.median(times):.2f} s, min {min(times):.2f}, "
            f"max {max(times):.2f} s over {repeats} runs"
        )


def time_sha256(size_gb: float, repeats: int) -> None:
    from shardmerge import hub

    size = int(size_gb * 1e9)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as scratch:
        path = Path(scratch) / "blob"
        with path.open("wb") as f:
            block = os.urandom(1 << 24)
            for pos in range(0, size, len(block)):
                f.write(block[: min(len(block), size - pos)])
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            hub._sha256_of(path)
            times.append(time.perf_counter() - start)
        gb = size / 1e9
        warm = times[1:]
        print(
            f"sha256 of {gb:.2f} GB: first run {times[0]:.2f} s; warm median "
            f"{statistics.median(warm):.3f} s (min {min(warm):.3f}, max {max(warm):.3f}) = "
            f"{statistics.median(warm) / gb:.3f} s/GB, {gb / statistics.median(warm):.2f} GB/s "
            f"over {repeats} runs"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    checks = sub.add_parser("checks")
    checks.add_argument("--repeats", type=int, default=20)
    refused = sub.add_parser("refused")
    refused.add_argument("--repeats", type=int, default=5)
    sha = sub.add_parser("sha256")
    sha.add_argument("--size-gb", type=float, default=1.0)
    sha.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.what == "checks":
        time_checks(args.repeats)
    elif args.what == "refused":
        time_refused(args.repeats)
    else:
        time_sha256(args.size_gb, args.repeats)


if __name__ == "__main__":
    main()
