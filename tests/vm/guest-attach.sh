#!/bin/sh
# Guest side of the attach-engine VM tests: runs the given test binaries (built on the host with
# `cargo test --no-run`, visible here at the same paths) against the guest kernel's dm-crypt.
# Started by tests/vm/attach-suite.sh through tests/vm/run.sh; do not run it on a host.
#   guest-attach.sh TEST_BINARY [TEST_BINARY...]   (extra test-harness args in VOLCRYPT_TEST_ARGS)
set -u
[ "${VOLCRYPT_VM:-}" = 1 ] || { echo "guest-attach: run me inside the VM (tests/vm/attach-suite.sh)" >&2; exit 2; }
[ $# -ge 1 ] || { echo "guest-attach: no test binaries given" >&2; exit 2; }
udev=no
[ -S /run/udev/control ] && udev=yes
echo "guest-attach: kernel $(uname -r), udev=$udev, $(nproc) vCPU"
rc=0
for bin in "$@"; do
    start=$(date +%s)
    echo "guest-attach: == $(basename "$bin")"
    # shellcheck disable=SC2086
    "$bin" --test-threads="${VOLCRYPT_TEST_THREADS:-2}" ${VOLCRYPT_TEST_ARGS:-} || rc=1
    echo "guest-attach: == $(basename "$bin") took $(( $(date +%s) - start )) s"
done
# Nothing may be left behind by the tests: no crypt mappings, no loop devices.
left=$(dmsetup ls --target crypt 2>/dev/null | grep -v '^No devices found' || true)
if [ -n "$left" ]; then
    echo "guest-attach: mappings left behind:" >&2
    echo "$left" >&2
    rc=1
fi
exit $rc
