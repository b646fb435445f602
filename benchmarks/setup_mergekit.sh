#!/usr/bin/env bash
# Install mergekit into its own virtualenv (benchmarks/.venv-mergekit, git-ignored) so that its
# pins never touch the project's .venv. Safe to rerun: an existing venv is reused.
#
#   bash benchmarks/setup_mergekit.sh            # mergekit 0.1.5 (the reference version)
#   MERGEKIT_VERSION=0.1.4 bash benchmarks/setup_mergekit.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${MERGEKIT_VENV:-$here/.venv-mergekit}"
version="${MERGEKIT_VERSION:-0.1.5}"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# CPU torch first (this machine has its wheel on local disk); left to mergekit's resolution,
# pip would pull a multi-GB CUDA build.
"${pip[@]}" install --quiet "torch==2.13.0"
"${pip[@]}" install --quiet "mergekit==$version"

"$venv/bin/mergekit-yaml" --help >/dev/null
echo "mergekit $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("mergekit"))')" \
    "with torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')" \
    "ready: $venv/bin/mergekit-yaml"
