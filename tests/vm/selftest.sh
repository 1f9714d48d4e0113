#!/usr/bin/env bash
# Host-side self-test of the VM harness (needs root; about 1-2 minutes on 2 idle cores):
#   1. smoke.sh without udev (DM_DISABLE_UDEV=1): LUKS2 on a loop device through dm-crypt;
#   2. smoke.sh with --udev: plus the by-id links and udev's LUKS probe;
#   3. a failing command: its exit status (7), stdout and stderr, --env and --rw come back,
#      and --forward reaches a host 127.0.0.1 server while the user-mode gateway stays closed;
#   4. --timeout: QEMU is killed and run.sh exits 124;
#   5. bad arguments exit 125 without booting; no QEMU is left running afterwards;
#   6. the test-count check (run-counted.sh) against fake test binaries: a shortfall, an
#      ignored test, a failure and a missing result line each fail, a full run passes;
#   7. the VM stage with dm_crypt not loaded (run.sh --without-module dm_crypt) FAILS, and
#      the tests themselves say the prerequisite is missing;
#   8. the Barbican tests with Barbican configured but not answering FAIL, every one of them.
# 7 and 8 use the test binaries: build them first (make test has; `cargo test --no-run`).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
export VOLCRYPT_VM_DIR=${VOLCRYPT_VM_DIR:-$REPO/.work/vm}
RUN=$HERE/run.sh

fails=0
pass() { echo "selftest: PASS $*"; }
failed() { echo "selftest: FAIL $*" >&2; fails=$((fails + 1)); }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }

t=$(now)
"$HERE/prepare.sh"
echo "selftest: prepare took $(secs "$t")s"

cd "$REPO"
scratch=$(mktemp -d "$VOLCRYPT_VM_DIR/selftest.XXXXXX")
HTTPD_PID=""
cleanup() {
    [[ -n $HTTPD_PID ]] && kill "$HTTPD_PID" 2>/dev/null && wait "$HTTPD_PID" 2>/dev/null
    rm -rf "$scratch"
}
trap cleanup EXIT

# 1 + 2: the smoke test, without and with udevd.
for mode in plain udev; do
    args=()
    [[ $mode == udev ]] && args=(--udev)
    t=$(now)
    if "$RUN" "${args[@]}" -- tests/vm/smoke.sh >"$scratch/smoke-$mode.out" 2>&1; then
        pass "smoke ($mode) in $(secs "$t")s"
    else
        failed "smoke ($mode), exit $?:"; cat "$scratch/smoke-$mode.out" >&2
    fi
done

# 3: exit status, output, --env, --rw, --forward.
mkdir -p "$scratch/www" "$scratch/rw"
echo "served-by-host" >"$scratch/www/probe.txt"
port=$((20000 + RANDOM % 20000))
busybox httpd -f -p "127.0.0.1:$port" -h "$scratch/www" &
HTTPD_PID=$!
sleep 0.3
t=$(now)
rc=0
"$RUN" --env SELFTEST_VALUE='two words' --rw "$scratch/rw" \
    --forward "10.0.2.100:9311=127.0.0.1:$port" -- sh -c '
        echo "env=$SELFTEST_VALUE"
        echo "to-stderr" >&2
        echo written-in-guest >"$1/file"
        busybox wget -q -O- http://10.0.2.100:9311/probe.txt
        busybox wget -q -O- http://10.0.2.100:9311/probe.txt
        if busybox wget -q -T 5 -O- "http://10.0.2.2:$2/probe.txt"; then echo gateway-open; fi
        exit 7' guest "$scratch/rw" "$port" >"$scratch/c.out" 2>"$scratch/c.err" || rc=$?
secs_c=$(secs "$t")
if [[ $rc == 7 ]] && grep -qx 'env=two words' "$scratch/c.out" && grep -qx to-stderr "$scratch/c.out" &&
   [[ $(grep -cx served-by-host "$scratch/c.out") == 2 ]] && ! grep -q gateway-open "$scratch/c.out" &&
   [[ $(cat "$scratch/rw/file" 2>/dev/null) == written-in-guest ]] &&
   grep -q 'exited with status 7' "$scratch/c.err"; then
    pass "exit status 7, output, --env, --rw and --forward (restricted) in ${secs_c}s"
else
    failed "status/env/rw/forward run: exit $rc"; cat "$scratch/c.out" "$scratch/c.err" >&2
fi
kill "$HTTPD_PID"; wait "$HTTPD_PID" 2>/dev/null || true; HTTPD_PID=""

# 4: timeout.
t=$(now)
rc=0
"$RUN" --timeout 3 -- sleep 600 >"$scratch/t.out" 2>&1 || rc=$?
if [[ $rc == 124 ]] && grep -q 'timed out after 3s' "$scratch/t.out"; then
    pass "timeout gives 124 in $(secs "$t")s"
else
    failed "timeout: exit $rc"; cat "$scratch/t.out" >&2
fi

# 5: bad arguments, and nothing left running.
for bad in "--forward 192.168.1.1:80=127.0.0.1:80" "--forward 10.0.2.100:80=10.0.0.1:80" \
           "--env 1BAD=x" "--timeout 0" "--bogus"; do
    rc=0
    # shellcheck disable=SC2086
    "$RUN" $bad -- true >"$scratch/bad.out" 2>&1 || rc=$?
    if [[ $rc == 125 ]]; then pass "rejects $bad"; else failed "'$bad' gave exit $rc"; fi
done
if pgrep -f "qemu-system-x86_64.*$VOLCRYPT_VM_DIR/runs/" >/dev/null; then
    failed "a QEMU of this harness is still running"
else
    pass "no QEMU left running"
fi

# 6: the count check, against fake libtest binaries (no VM needed).
fake() { # fake NAME LISTED RESULT-LINE EXIT
    cat >"$scratch/$1-0123abcd" <<FAKE
#!/bin/sh
if [ "\$1" = --list ]; then i=0; while [ \$i -lt $2 ]; do echo "t\$i: test"; i=\$((i + 1)); done; echo; echo "$2 tests, 0 benchmarks"; exit 0; fi
echo "$3"
exit $4
FAKE
    chmod +x "$scratch/$1-0123abcd"
}
fake full 3 "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s" 0
fake short 3 "test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s" 0
fake ignored 3 "test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s" 0
fake failing 3 "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s" 101
fake crashed 3 "running 3 tests" 134
for f in full short ignored failing crashed; do
    rc=0
    "$HERE/run-counted.sh" "$scratch/$f-0123abcd" >"$scratch/count-$f.out" 2>&1 || rc=$?
    if [[ $f == full ]]; then
        if [[ $rc == 0 ]] && grep -q 'full: 3 of 3 tests ran and passed' "$scratch/count-$f.out"; then
            pass "count check accepts a full run"
        else failed "count check refused a full run (exit $rc)"; cat "$scratch/count-$f.out" >&2; fi
    elif [[ $rc != 0 ]] && grep -q "run-counted: FAIL $f" "$scratch/count-$f.out"; then
        pass "count check fails a $f run"
    else
        failed "count check let a $f run pass (exit $rc)"; cat "$scratch/count-$f.out" >&2
    fi
done

# 7: a guest without dm_crypt must fail the VM stage, through the tests' own checks.
t=$(now)
rc=0
VOLCRYPT_VM_RUN_ARGS="--without-module dm_crypt" VOLCRYPT_VM_TIMEOUT=600 \
    "$HERE/attach-suite.sh" refuses_to_format_a_device_with >"$scratch/nodm.out" 2>&1 || rc=$?
if [[ $rc != 0 && $rc != 124 && $rc != 125 ]] &&
   grep -q 'the dm_crypt kernel module is not loaded' "$scratch/nodm.out" &&
   grep -q 'run-counted: FAIL volume_vm' "$scratch/nodm.out" &&
   ! grep -q 'run-counted: volume_vm: .* ran and passed' "$scratch/nodm.out"; then
    pass "a VM without dm_crypt fails the stage (exit $rc) in $(secs "$t")s"
else
    failed "VM without dm_crypt: exit $rc"; tail -n 40 "$scratch/nodm.out" >&2
fi

# 8: os-brick's venv missing in the guest: the interop tests fail, they do not pass without it.
t=$(now)
rc=0
VOLCRYPT_VM_RUN_ARGS="--env VOLCRYPT_OSBRICK_VENV=$scratch/no-such-venv" VOLCRYPT_VM_TIMEOUT=600 \
    "$HERE/attach-suite.sh" passphrase_that_is_not_utf8 >"$scratch/novenv.out" 2>&1 || rc=$?
if [[ $rc != 0 && $rc != 124 && $rc != 125 ]] &&
   grep -q 'no-such-venv/bin/python missing: run scripts/osbrick-venv.sh' "$scratch/novenv.out" &&
   grep -q 'run-counted: FAIL osbrick_vm' "$scratch/novenv.out" &&
   ! grep -q 'run-counted: osbrick_vm: .* ran and passed' "$scratch/novenv.out"; then
    pass "a guest without os-brick's venv fails the interop tests (exit $rc) in $(secs "$t")s"
else
    failed "guest without os-brick's venv: exit $rc"; tail -n 40 "$scratch/novenv.out" >&2
fi

# 9: Barbican configured but not answering: every Barbican test fails, none passes.
bin=$(cargo test --no-run --message-format=json --test keys_barbican 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*keys_barbican[^"]*\)".*/\1/p' | tail -n 1)
if [[ -x $bin ]]; then
    dead=$((20000 + RANDOM % 20000))
    rc=0
    VOLCRYPT_TEST_BARBICAN_URL=http://127.0.0.1:$dead VOLCRYPT_TEST_BARBICAN_TLS_URL=https://127.0.0.1:$dead \
        VOLCRYPT_TEST_BARBICAN_CA=/dev/null "$bin" >"$scratch/dead.out" 2>&1 || rc=$?
    listed=$("$bin" --list | grep -c ': test$')
    if [[ $rc != 0 ]] && grep -q "test result: FAILED. 0 passed; $listed failed" "$scratch/dead.out" &&
       grep -q 'is configured but does not answer' "$scratch/dead.out"; then
        pass "Barbican configured but stopped: all $listed Barbican tests fail"
    else
        failed "Barbican configured but stopped: exit $rc"; tail -n 30 "$scratch/dead.out" >&2
    fi
else
    failed "cannot find the keys_barbican test binary (build it first)"
fi

if ((fails)); then echo "selftest: $fails failure(s)" >&2; exit 1; fi
echo "selftest: all passed"
