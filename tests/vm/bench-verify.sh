#!/usr/bin/env bash
# Verify-cost benchmark: builds volcrypt (release by default) on the host, then boots the VM
# (tests/vm/run.sh) and runs tests/vm/guest-bench-verify.sh there: one attached LUKS2 volume,
# ROUNDS alternating rounds of `dd iflag=direct` reading the whole mapping (the reference) and
# `volcrypt verify --full` of it, printed as a ratio from one run (goal: verify at >= 0.8x the
# speed of dd). A benchmark, not a test: it fails on errors only, never on the ratio. Under TCG
# both sides run emulated AES, so only the ratio means anything.
#
#   tests/vm/bench-verify.sh [ROUNDS] [DATA_MIB]   (VOLCRYPT_BENCH_PROFILE=debug to skip --release)
set -euo pipefail
cd "$(dirname "$0")/../.."

rounds=${1:-3}
mib=${2:-64}
profile=${VOLCRYPT_BENCH_PROFILE:-release}
target=${CARGO_TARGET_DIR:-$PWD/target}
echo "bench-verify: building volcrypt ($profile)"
if [[ $profile == release ]]; then
    cargo build --release --bin volcrypt
else
    cargo build --bin volcrypt
fi
bin=$target/$profile/volcrypt
[[ -x $bin ]] || { echo "bench-verify: $bin not built" >&2; exit 1; }

tests/vm/prepare.sh
start=$(date +%s)
set +e
tests/vm/run.sh --udev --mem 1536 --timeout "${VOLCRYPT_VM_TIMEOUT:-1200}" -- \
    "$PWD/tests/vm/guest-bench-verify.sh" "$bin" "$rounds" "$mib"
rc=$?
set -e
echo "bench-verify: VM round (boot + benchmark + poweroff) took $(( $(date +%s) - start )) s, exit $rc"
exit $rc
