#!/bin/bash
# Guest side of the attach-engine VM tests: runs the given test binaries (built on the host with
# `cargo test --no-run`, visible here at the same paths) against the guest kernel's dm-crypt.
# Started by tests/vm/attach-suite.sh through tests/vm/run.sh; do not run it on a host.
#   guest-attach.sh TEST_BINARY [TEST_BINARY...]   (extra test-harness args in VOLCRYPT_TEST_ARGS)
# Each binary runs with --include-ignored (the dm-crypt tests are ignored natively) through
# run-counted.sh, which fails it unless every test it contains ran and passed; a filter that
# selects no test at all fails the stage too.
set -u
here=$(cd "$(dirname "$0")" && pwd)
[ "${VOLCRYPT_VM:-}" = 1 ] || { echo "guest-attach: run me inside the VM (tests/vm/attach-suite.sh)" >&2; exit 2; }
[ $# -ge 1 ] || { echo "guest-attach: no test binaries given" >&2; exit 2; }
udev=no
[ -S /run/udev/control ] && udev=yes
echo "guest-attach: kernel $(uname -r), udev=$udev, $(nproc) vCPU"
# shellcheck disable=SC2206
args=(${VOLCRYPT_TEST_ARGS:-})
rc=0
summary=()
total=0
for bin in "$@"; do
    start=$(date +%s)
    echo "guest-attach: == $(basename "$bin")"
    n=$("$bin" --list --include-ignored "${args[@]}" 2>/dev/null | grep -c ': test$')
    total=$((total + n))
    line=$("$here/run-counted.sh" "$bin" --test-threads="${VOLCRYPT_TEST_THREADS:-2}" "${args[@]}" 2>&1 |
        tee /dev/stderr | grep '^run-counted: ' | tail -n 1)
    [[ $line == *"tests ran and passed" ]] || rc=1
    summary+=("${line:-run-counted: $(basename "$bin"): no summary} ($(( $(date +%s) - start )) s)")
done
if ((total == 0)); then
    echo "guest-attach: FAIL: no test selected (filter '${VOLCRYPT_TEST_ARGS:-}' matched nothing)" >&2
    rc=1
fi
# Nothing may be left behind by the tests: no crypt mappings, no loop devices.
left=$(dmsetup ls --target crypt 2>/dev/null | grep -v '^No devices found' || true)
if [ -n "$left" ]; then
    echo "guest-attach: mappings left behind:" >&2
    echo "$left" >&2
    rc=1
fi
echo "guest-attach: summary"
printf '  %s\n' "${summary[@]}"
echo "guest-attach: $total tests selected, exit $rc"
exit $rc
