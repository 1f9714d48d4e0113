#!/usr/bin/env bash
# Reboot-storm benchmark: builds volcrypt (release by default) on the host, then boots the VM
# (tests/vm/run.sh) and runs tests/vm/guest-bench-reactivate.sh there: N LUKS2 volumes on loop
# devices with one fixed argon2id cost (so the KDF dominates), journaled through the agent, all
# mappings closed, the agent restarted; the time until its start-up pass has every volume active
# is compared, in the same run, with
#   - serial: the same volumes opened one after another by `cryptsetup open`, and
#   - ideal:  sum of KDF time / min(vCPUs, budget / per-volume KDF memory).
# A benchmark, not a test (not in `make test`): it fails on errors only, never on a ratio.
# Goals: <= 1.15 x ideal, <= 0.55 x serial on 2 vCPUs.
#
#   tests/vm/bench-reactivate.sh [N] [ARGON_MEMORY_KIB]   (defaults: 50 volumes, 32768 KiB)
#   VOLCRYPT_BENCH_PROFILE=debug tests/vm/bench-reactivate.sh 8   (skip --release)
set -euo pipefail
cd "$(dirname "$0")/../.."

n=${1:-50}
mem_kib=${2:-32768}
profile=${VOLCRYPT_BENCH_PROFILE:-release}
target=${CARGO_TARGET_DIR:-$PWD/target}
echo "bench-reactivate: building volcrypt ($profile)"
if [[ $profile == release ]]; then
    cargo build --release --bin volcrypt
else
    cargo build --bin volcrypt
fi
bin=$target/$profile/volcrypt
[[ -x $bin ]] || { echo "bench-reactivate: $bin not built" >&2; exit 1; }

tests/vm/prepare.sh
start=$(date +%s)
set +e
tests/vm/run.sh --mem 1536 --timeout "${VOLCRYPT_VM_TIMEOUT:-3600}" -- \
    "$PWD/tests/vm/guest-bench-reactivate.sh" "$bin" "$n" "$mem_kib"
rc=$?
set -e
echo "bench-reactivate: VM round (boot + benchmark + poweroff) took $(( $(date +%s) - start )) s, exit $rc"
exit $rc
