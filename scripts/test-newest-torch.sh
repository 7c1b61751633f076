#!/usr/bin/env bash
# Run the test suite on the newest torch release, in a virtual environment of its own.
#
#   scripts/test-newest-torch.sh [VENV] [-- PYTEST_ARGS...]
#
# VENV (default: .venv-newest-torch in the repository root) is created when missing. The
# newest torch on the package index is installed into it (set TORCH_VERSION=2.15.0 to pin
# a release); an existing VENV that already has torch (at TORCH_VERSION, when set) is used
# as it is, without downloading anything. The index serves torch's CUDA build with its
# NVIDIA packages (several GB); it runs on CPU. Then the package is installed in editable
# mode with its test extra, and pytest runs from the repository root (arguments after `--`
# go to pytest, e.g. `-- -x tests/test_partition_graphs.py`).
#
# A pip configuration that caps torch through a constraints file (`pip config list`) is
# lifted for this script's pip commands only: PIP_CONSTRAINT=/dev/null overrides the
# configured constraints and keeps the rest (indexes, certificates). CI (.ci/run) stays on
# the pinned torch and does not call this script.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-newest-torch
if [[ $# -gt 0 && "$1" != "--" ]]; then venv="$1"; shift; fi
if [[ $# -gt 0 && "$1" == "--" ]]; then shift; fi
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "creating $venv" >&2
    "$python" -m venv "$venv"
fi
pip() { PIP_CONSTRAINT=/dev/null "$venv/bin/python" -m pip "$@"; }

have="$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [[ -n "$have" && ( -z "${TORCH_VERSION:-}" || "$have" == "$TORCH_VERSION" ) ]]; then
    echo "using torch $have already in $venv" >&2
else
    pip install --upgrade "torch${TORCH_VERSION:+==$TORCH_VERSION}"
fi
pip install -e ".[test]"
"$venv/bin/python" -c 'import torch; print("testing with torch", torch.__version__)'
exec "$venv/bin/python" -m pytest -q "$@"
