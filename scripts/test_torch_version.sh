#!/usr/bin/env bash
# The test suite on another PyTorch release, in a venv of its own (.venv-torch<VERSION>), so that the range in
# requirements.txt (torch>=2.4) is a tested one and not a hope:
#   bash scripts/test_torch_version.sh 2.4.1 --min-deps   # the floor: every other requirement at its lowest version
#   bash scripts/test_torch_version.sh 2.11.0             # the GPU machine's release, run on the CPU
# torchvision 0.<minor + 15>.<patch> goes with torch 2.<minor>.<patch>. pip downloads a CUDA build of the given
# torch (a few GB) unless it is on this disk. Extra arguments after the options go to pytest. PYTHON picks the
# interpreter (default python3), e.g. PYTHON=python3.10 for the floor of setup.py's python_requires; a venv per
# interpreter then (.venv-torch<VERSION>-python3.10).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 || ! "$1" =~ ^2\.([0-9]+)\.([0-9]+)$ ]]; then
    echo "usage: $0 TORCH_VERSION (2.<minor>.<patch>) [--min-deps] [pytest args...]" >&2
    exit 2
fi
torch_version=$1
torchvision_version="0.$((BASH_REMATCH[1] + 15)).${BASH_REMATCH[2]}"
shift
min_deps=false
if [[ "${1:-}" == "--min-deps" ]]; then
    min_deps=true
    shift
fi

python=${PYTHON:-python3}
venv=".venv-torch${torch_version}${PYTHON:+-$(basename "$PYTHON")}"
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q "torch==${torch_version}" "torchvision==${torchvision_version}"
"$venv/bin/python" -m pip install -q -e '.[dev]'
if $min_deps; then
    # the lower bounds of requirements.txt and of the export and convert extras as exact pins (torch and
    # torchvision are the ones chosen above)
    cat requirements.txt requirements-export.txt requirements-convert.txt | grep -v '^torch' \
        | sed -n 's/^\([A-Za-z0-9_.-]*\)>=\([0-9.]*\).*/\1==\2/p' > "$venv/floors.txt"
    "$venv/bin/python" -m pip install -q -r "$venv/floors.txt"
fi
"$venv/bin/python" -c 'import numpy, torch, torchvision; print("torch", torch.__version__, "torchvision",
      torchvision.__version__, "numpy", numpy.__version__)'
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" tests
