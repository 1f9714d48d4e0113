#!/usr/bin/env bash
# The attach-engine VM stage: build the volume test binaries on the host, then boot the VM
# (tests/vm/run.sh, with udevd; the stale-mapping test loads scsi_debug itself) and run them there against real dm-crypt.
# With VOLCRYPT_TEST_BARBICAN_URL=http://127.0.0.1:PORT set (scripts/barbican-test-server.sh),
# the guest reaches that Barbican at 10.0.2.100:9311; the tests that use Barbican require it
# (without it they fail, they do not skip).
# Every test of every binary must run and pass (tests/vm/run-counted.sh checks the counts).
#
#   tests/vm/attach-suite.sh [TEST-NAME-FILTER]
#   VOLCRYPT_VM_RUN_ARGS="--without-module dm_crypt" tests/vm/attach-suite.sh FILTER
#       (extra tests/vm/run.sh options; the harness self-test uses this to prove a guest
#        without dm-crypt fails)
set -euo pipefail
cd "$(dirname "$0")/../.."

filter=${1:-}
echo "attach-suite: building test binaries"
mapfile -t bins < <(cargo test --no-run --features test-hooks --message-format=json --test volume_vm --test volume_native --test rpc_vm --test journal_vm --test udev_vm --test safety_vm --test images_vm --test osbrick_vm 2>/dev/null |
    python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
((${#bins[@]} == 8)) || { echo "attach-suite: expected 8 test binaries, built ${#bins[@]}" >&2; exit 1; }

# os-brick from PyPI for osbrick_vm (pinned; made once, then reused): pip failing fails the stage.
osbrick_venv=$(scripts/osbrick-venv.sh)

# serpent: the fallback test opens a volume whose cipher volcrypt's own engine does not run.
args=(--udev --timeout "${VOLCRYPT_VM_TIMEOUT:-3600}" --mem 1536 --module serpent_generic
      --env "VOLCRYPT_OSBRICK_VENV=$osbrick_venv")
url=${VOLCRYPT_TEST_BARBICAN_URL:-}
if [[ $url =~ ^https?://127\.0\.0\.1:([0-9]+)/?$ ]]; then
    args+=(--forward "10.0.2.100:9311=127.0.0.1:${BASH_REMATCH[1]}"
           --env VOLCRYPT_TEST_BARBICAN_URL=http://10.0.2.100:9311)
else
    echo "attach-suite: WARNING: VOLCRYPT_TEST_BARBICAN_URL is not a 127.0.0.1 URL: the tests that" \
         "use Barbican will FAIL (start one: eval \"\$(scripts/barbican-test-server.sh start)\")" >&2
fi
[[ -n $filter ]] && args+=(--env "VOLCRYPT_TEST_ARGS=$filter")
# shellcheck disable=SC2206
args+=(${VOLCRYPT_VM_RUN_ARGS:-})

tests/vm/prepare.sh
start=$(date +%s)
set +e
tests/vm/run.sh "${args[@]}" -- "$PWD/tests/vm/guest-attach.sh" "${bins[@]}"
rc=$?
set -e
echo "attach-suite: VM round (boot + tests + poweroff) took $(( $(date +%s) - start )) s, exit $rc"
exit $rc
