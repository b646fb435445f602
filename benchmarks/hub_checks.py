"""Cost of issue 18's Hub safeguards: the pre-push checks, and sha256 verification per GB.

    python benchmarks/hub_checks.py checks --repeats 20      # on the loopback fake Hub
    python benchmarks/hub_checks.py refused --repeats 5      # a whole `run` refused up front
    python benchmarks/hub_checks.py sha256 --size-gb 1 --repeats 5
    python benchmarks/hub_checks.py stream --rate-mb 25 --repeats 3 \\
        --stream-budgets default,282MB,100GB                         # issue 17

``checks`` times ``hub.check_push_target`` (token, whoami, repo info) against
``tests/fakehub.py`` on 127.0.0.1, for a new and for an existing target repo, in-process with
huggingface_hub already imported. ``refused`` times the whole ``shardmerge run ... --push-to-hub``
process refused for a read-only token (start-up and imports included). ``sha256`` writes a file of random bytes and times the same
function that checks each downloaded shard (``hub._sha256_of``), page cache warm after the first
run; the first (cold) run is reported apart. ``stream`` serves a generated pair (make_pair.py's
medium shapes at 4 layers, ~0.6 GB per model, A in 100 MB and B in 150 MB shards) from the fake
Hub at ``--rate-mb`` MB/s per transfer (the real Hub's rate per stream is capped likewise), and
times, alternating: the download alone (every shard, as many transfers at once as ``--stream``
runs: two per model), ``shardmerge run --stream`` at each of ``--stream-budgets``, and
``shardmerge run`` (download all, then merge); each a whole process, start-up included.
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


_DOWNLOAD_ALONE = """
import sys, threading
from concurrent.futures import ThreadPoolExecutor
from huggingface_hub import hf_hub_download
from shardmerge.hub import STREAM_WORKERS_PER_INPUT

def fetch_all(repo, files, folder):
    with ThreadPoolExecutor(STREAM_WORKERS_PER_INPUT) as pool:
        list(pool.map(lambda f: hf_hub_download(repo, f, local_dir=folder), files))

jobs = [(sys.argv[i], sys.argv[i + 1].split(","), sys.argv[i + 2]) for i in (1, 4)]
threads = [threading.Thread(target=fetch_all, args=job) for job in jobs]
for t in threads: t.start()
for t in threads: t.join()
"""


def time_stream(rate_mb: float, repeats: int, budgets: list[str]) -> None:
    import subprocess

    from benchmarks import make_pair
    from tests.conftest import folder_files
    from tests.fakehub import FakeHub, etag_of, git_blob_sha1

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as root:
        pair = Path(root) / "pair"
        make_pair.main(["--preset", "medium", "--layers", "4", "--shard-size-a", "100MB",
                        "--shard-size-b", "150MB", "--out", str(pair)])  # fmt: skip
        with FakeHub() as fake:
            shards = {}
            for name in ("a", "b"):
                files = folder_files(pair / name)
                fake.add_repo(f"org/{name}", files)
                shards[name] = sorted(f for f in files if f.endswith(".safetensors"))
                for path, data in files.items():  # the fake's hashes, computed once up front
                    etag_of(path, data)
                    git_blob_sha1(data)
            total = sum(len(fake.files(f"org/{n}")[f]) for n in shards for f in shards[n])
            fake.body_bytes_per_second = rate_mb * 1e6
            recipe = Path(root) / "recipe.yaml"
            recipe.write_text("models:\n  a: org/a\n  b: org/b\nt: 0.5\n")
            env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
            env.update(HF_ENDPOINT=fake.url, HF_TOKEN="hf_fake", HF_HUB_DISABLE_XET="1")
            env.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
            streams = [f"stream {b}" for b in budgets]
            runs: dict[str, list[float]] = {w: [] for w in ["download", *streams, "cached"]}
            spans: dict[str, list[tuple[float, float, float]]] = {what: [] for what in runs}
            for i in range(repeats):
                for what in runs:
                    work = Path(root) / f"{what}-{i}"
                    home = work / "hf-home"  # a fresh cache: every run downloads everything
                    if what == "download":
                        args = ["-c", _DOWNLOAD_ALONE]
                        for n in shards:
                            args += [f"org/{n}", ",".join(shards[n]), str(work / n)]
                    else:
                        args = ["-m", "shardmerge.cli", "run", str(recipe), "--quiet"]
                        args += ["--out", str(work / "out")]
                    if what.startswith("stream "):
                        budget = what.split(" ", 1)[1]
                        args += ["--stream"]
                        args += [] if budget == "default" else ["--stream-budget", budget]
                    fake.transfers.clear()
                    start = time.monotonic()
                    done = subprocess.run([sys.executable, *args], env={**env, "HF_HOME": str(home)},
                                          capture_output=True, text=True)  # fmt: skip
                    runs[what].append(time.monotonic() - start)
                    if done.returncode != 0:
                        raise SystemExit(f"{what} failed: {done.stderr}")
                    # Where the time goes, from the server's clock: the first shard body
                    # started, the last one ended, and how many were sent at once on average.
                    times = [t - start for t, _, _ in fake.transfers]
                    busy = 0.0
                    level, last = 0, 0.0
                    for t, kind, _ in fake.transfers:
                        busy += level * (t - start - last)
                        level, last = level + (1 if kind == "start" else -1), t - start
                    spans[what].append((min(times), max(times), busy / (max(times) - min(times))))
                    subprocess.run(["rm", "-rf", str(work)], check=True)
        gb = total / 1e9
        print(f"inputs {gb:.2f} GB from the fake Hub at {rate_mb:g} MB/s per transfer; "
              f"{repeats} alternating runs (wall s, median [all]):")  # fmt: skip
        base = statistics.median(runs["download"])
        labels = {"download": "download alone (2 transfers per model)"}
        labels.update({f"stream {b}": f"shardmerge run --stream, budget {b}" for b in budgets})
        labels["cached"] = "shardmerge run (download all, then merge)"
        for what, label in labels.items():
            med = statistics.median(runs[what])
            shown = ", ".join(f"{t:.2f}" for t in runs[what])
            first, last, level = (statistics.median(x) for x in zip(*spans[what], strict=True))
            print(f"  {label}: {med:.2f} s [{shown}], {med / base:.2f}x the download; shard "
                  f"bodies from {first:.2f} to {last:.2f} s, {level:.1f} at once on average")  # fmt: skip


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
    stream = sub.add_parser("stream")
    stream.add_argument("--rate-mb", type=float, default=25.0, help="MB/s per transfer")
    stream.add_argument("--repeats", type=int, default=3)
    stream.add_argument(
        "--stream-budgets",
        default="default",
        help="comma-separated --stream-budget values to time, `default` for none",
    )
    args = parser.parse_args()
    if args.what == "checks":
        time_checks(args.repeats)
    elif args.what == "refused":
        time_refused(args.repeats)
    elif args.what == "stream":
        time_stream(args.rate_mb, args.repeats, args.stream_budgets.split(","))
    else:
        time_sha256(args.size_gb, args.repeats)


if __name__ == "__main__":
    main()
