#!/usr/bin/env bash
# Runs one Rust test binary with --include-ignored and fails unless every test it contains
# (after the same filter) ran and passed: a green VM stage must mean each test was executed,
# not skipped, filtered away or lost with a crashed binary.
#
#   run-counted.sh TEST_BINARY [TEST-HARNESS-ARGS...]
#
# The expected number comes from `TEST_BINARY --list --include-ignored ARGS` (lines ending in
# `: test`); the actual one from the binary's `test result:` line, which must say
# `N passed; 0 failed; 0 ignored` with N equal to it. Prints one summary line:
#   run-counted: volume_vm: 25 of 25 tests ran and passed
# Used by tests/vm/guest-attach.sh; tests/vm/selftest.sh checks it against fake binaries.
set -uo pipefail

(($# >= 1)) || { echo "usage: run-counted.sh TEST_BINARY [ARGS...]" >&2; exit 2; }
bin=$1
shift
name=$(basename "$bin")
name=${name%-*} # cargo's hash suffix
[[ -n $name ]] || name=$(basename "$bin")

if ! list=$("$bin" --list --include-ignored "$@" 2>&1); then
    echo "run-counted: $name: --list failed:" >&2
    echo "$list" >&2
    exit 1
fi
expected=$(grep -c ': test$' <<<"$list")

out=$(mktemp "${TMPDIR:-/tmp}/run-counted.XXXXXX")
trap 'rm -f "$out"' EXIT
"$bin" --include-ignored "$@" 2>&1 | tee "$out"
status=${PIPESTATUS[0]}

result=$(grep -E '^test result: ' "$out" | tail -n 1)
if [[ $result =~ ([0-9]+)\ passed\;\ ([0-9]+)\ failed\;\ ([0-9]+)\ ignored ]]; then
    passed=${BASH_REMATCH[1]} failed=${BASH_REMATCH[2]} ignored=${BASH_REMATCH[3]}
else
    echo "run-counted: FAIL $name: no 'test result:' line (exit $status): the binary died or did not run" >&2
    exit 1
fi
if ((status != 0 || failed != 0)); then
    echo "run-counted: FAIL $name: $failed of $expected tests failed (exit $status)" >&2
    exit 1
fi
if ((passed != expected || ignored != 0)); then
    echo "run-counted: FAIL $name: only $passed of $expected tests ran and passed ($ignored ignored): a shortfall is a failure" >&2
    exit 1
fi
echo "run-counted: $name: $passed of $expected tests ran and passed"
