#!/usr/bin/env bash
# Re-check pyproject.toml's lower bounds: install the LOWEST version of every direct
# dependency that the ranges allow (uv's --resolution lowest-direct) into a scratch venv,
# then run the non-slow tests there. CI (.ci/run) resolves the newest versions instead;
# run this by hand after changing a bound (about 4 minutes on 2 cores, plus downloads).
#
#   tools/check_lowest_deps.sh [VENV_DIR]       (default: a temporary directory, removed after)
#
# torch is installed first with pip (so pip's own configuration applies: set
# TORCH_CPU_INDEX to PyTorch's CPU wheel index where the default index serves the CUDA
# build); uv then keeps that torch and resolves everything else at its lowest.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-}"
if [[ -z "$venv" ]]; then
    venv="$(mktemp -d)/lowest"
    trap 'rm -rf "$(dirname "$venv")"' EXIT
fi

python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip uv
torch_pin="$(grep -o '"torch==[^"]*"' "$repo/pyproject.toml" | tr -d '"')"
"$venv/bin/python" -m pip install -q ${TORCH_CPU_INDEX:+--index-url "$TORCH_CPU_INDEX"} "$torch_pin"
"$venv/bin/uv" pip install -q --python "$venv/bin/python" --resolution lowest-direct -e "$repo[dev]"

echo "lowest versions resolved:"
"$venv/bin/uv" pip freeze --python "$venv/bin/python" | grep -v '^-e ' | sed 's/^/  /'
cd "$repo"
"$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider
