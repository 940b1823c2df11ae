#!/usr/bin/env bash
# Runs the test suite once per OpenBLAS kernel, forced with OPENBLAS_CORETYPE, so that an
# assertion which holds only for the kernel this CPU picks shows up on any x86_64 machine.
#
#   tools/check_blas_kernels.sh [KERNEL ...] [-- PYTEST ARGS]
#
# Default kernels: Haswell (AVX2, what DYNAMIC_ARCH picks on many AMD EPYC), SkylakeX
# (AVX-512), Sandybridge (AVX) and Prescott (SSE3, runs as Katmai). Each run prints the kernel
# numpy really loaded (threadpoolctl when installed, else numpy's own config) and pytest's
# closing line; the script exits non-zero when any run fails.
set -uo pipefail
cd "$(dirname "$0")/.."

kernels=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do kernels+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#kernels[@]} -eq 0 ] && kernels=(Haswell SkylakeX Sandybridge Prescott)
pytest_args=("$@")
[ ${#pytest_args[@]} -eq 0 ] && pytest_args=(-q)

status=0
for kernel in "${kernels[@]}"; do
    loaded=$(OPENBLAS_CORETYPE="$kernel" python - <<'PY'
import numpy
try:
    import threadpoolctl
    print(",".join(i.get("architecture", "?") for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"))
except ImportError:  # not a dependency: the build's BLAS name at least
    print(numpy.show_config(mode="dicts")["Build Dependencies"]["blas"].get("name", "?"))
PY
)
    echo "== OPENBLAS_CORETYPE=$kernel (numpy's BLAS runs: $loaded)"
    log=$(mktemp)
    OPENBLAS_CORETYPE="$kernel" python -m pytest "${pytest_args[@]}" -p no:cacheprovider >"$log" 2>&1
    rc=$?
    grep -E "^(FAILED|ERROR) " "$log"
    tail -n 1 "$log"
    rm -f "$log"
    [ $rc -ne 0 ] && status=1
done
exit $status
