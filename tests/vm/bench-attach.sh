#!/usr/bin/env bash
# Attach-overhead benchmark: builds volcrypt (release by default) on the host, then
# boots the VM (tests/vm/run.sh, with udevd) and runs tests/vm/guest-bench-attach.sh there:
# volcrypt RPC attach/detach vs `cryptsetup open`/`close` as subprocesses, same LUKS2 volume,
# PBKDF2 1000 iterations, ROUNDS rounds each, printed as ratios from one run. A benchmark, not a
# test: it fails on errors only, never on the ratio (target: volcrypt <= 0.5x the subprocess).
#
#   tests/vm/bench-attach.sh [ROUNDS]        (VOLCRYPT_BENCH_PROFILE=debug to skip --release)
#
# VOLCRYPT_BENCH_LOG=FILTER (e.g. `volcrypt=debug`) runs the agent with that log filter and prints
# the mean of each engine phase from its `attach phases`/`detach phases` debug lines, and the
# agent log's last lines (debug logging itself costs a little time: use it to profile, not for
# the final figure).
set -euo pipefail
cd "$(dirname "$0")/../.."

rounds=${1:-50}
profile=${VOLCRYPT_BENCH_PROFILE:-release}
target=${CARGO_TARGET_DIR:-$PWD/target}
echo "bench-attach: building volcrypt ($profile)"
if [[ $profile == release ]]; then
    cargo build --release --bin volcrypt
else
    cargo build --bin volcrypt
fi
bin=$target/$profile/volcrypt
[[ -x $bin ]] || { echo "bench-attach: $bin not built" >&2; exit 1; }

tests/vm/prepare.sh
start=$(date +%s)
set +e
envs=()
[[ -n ${VOLCRYPT_BENCH_LOG:-} ]] && envs+=(--env VOLCRYPT_BENCH_LOG)
tests/vm/run.sh --udev --mem 1536 --timeout "${VOLCRYPT_VM_TIMEOUT:-1200}" "${envs[@]}" -- \
    "$PWD/tests/vm/guest-bench-attach.sh" "$bin" "$rounds"
rc=$?
set -e
echo "bench-attach: VM round (boot + benchmark + poweroff) took $(( $(date +%s) - start )) s, exit $rc"
exit $rc
