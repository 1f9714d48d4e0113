#!/usr/bin/env bash
# Creates (once) a virtualenv with OpenStack's os-brick from PyPI for the os-brick interop tests
# (tests/osbrick_vm.rs through tests/vm/osbrick_driver.py), and prints its path on stdout.
#
#   scripts/osbrick-venv.sh [VENV_DIR]
#
# VENV_DIR defaults to $VOLCRYPT_OSBRICK_VENV, else $VOLCRYPT_VM_DIR/osbrick-venv, else
# .work/vm/osbrick-venv: beside the VM cache, because the VM guest must see the venv at the
# same path (it mounts the host's root read-only but hides /tmp, /var/tmp, /var/lib and /run
# under tmpfs — a venv there would be invisible to the tests).
# Idempotent: a venv whose marker names the pinned version and the constraints' checksum is
# reused as it is; any other venv at that path is rebuilt. os-brick's dependencies are pinned
# too (scripts/osbrick-constraints.txt, `pip freeze` of a venv the tests passed with), so a new
# oslo.* release on PyPI cannot change the reference implementation under the tests.
# pip failing fails this script (and with it the VM stage of `make test`): the interop tests
# must never quietly lose their reference implementation.
set -euo pipefail

# The os-brick release the interop tests run against (installs on Debian 12's Python 3.11).
OSBRICK_VERSION=7.1.1
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
vmdir=${VOLCRYPT_VM_DIR:-$repo/.work/vm}
[[ $vmdir == /* ]] || vmdir="$PWD/$vmdir"
venv="${1:-${VOLCRYPT_OSBRICK_VENV:-$vmdir/osbrick-venv}}"
python="${PYTHON:-python3}"
constraints="$repo/scripts/osbrick-constraints.txt"
marker="$venv/.volcrypt-os-brick-$OSBRICK_VERSION-$(sha256sum "$constraints" | cut -c1-16)"

log() { echo "osbrick-venv: $*" >&2; }

case $venv in
    /*) ;;
    *) log "the venv path must be absolute (the VM sees it at the same path): $venv"; exit 2 ;;
esac
case $venv in
    /tmp/*|/var/tmp/*|/var/lib/*|/run/*)
        log "WARNING: $venv is hidden inside the VM (tmpfs there); the interop tests will fail" ;;
esac

if [[ -f $marker ]] && "$venv/bin/python" -W ignore -c 'import os_brick.encryptors' 2>/dev/null; then
    echo "$venv"
    exit 0
fi

log "installing os-brick==$OSBRICK_VERSION into $venv"
t0=$SECONDS
if [[ -e $venv && ! -f $venv/pyvenv.cfg ]]; then
    log "$venv exists and is not a virtualenv: refusing to replace it"
    exit 2
fi
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
"$python" -m venv "$venv"
if ! "$venv/bin/pip" install --quiet --disable-pip-version-check -c "$constraints" \
        "os-brick==$OSBRICK_VERSION" >&2; then
    log "FAILED: pip install os-brick==$OSBRICK_VERSION (the os-brick interop tests need it)"
    rm -rf "$venv"
    exit 1
fi
"$venv/bin/python" -W ignore -c 'import os_brick.encryptors' || {
    log "FAILED: os_brick.encryptors does not import from $venv"
    exit 1
}
touch "$marker"
log "installed in $((SECONDS - t0)) s"
echo "$venv"
