#!/bin/bash
# Runs inside the VM, in the chroot on the host's root (started by guest-init.sh).
# Starts udevd when asked, runs the caller's command (cmd.sh, written by run.sh) with a clean
# environment, and leaves its output and exit code in the results share for the host.
set -u
RES=/run/volcrypt-vm
# shellcheck source=/dev/null
. "$RES/config"

log() { echo "vm-guest: $*" >/dev/console; }

if [[ ${VM_UDEV:-0} == 1 ]]; then
    # udevd and udevadm refuse to act in a chroot unless told to ignore it.
    export SYSTEMD_IGNORE_CHROOT=1
    udevd=/lib/systemd/systemd-udevd
    [[ -x $udevd ]] || udevd=/usr/lib/systemd/systemd-udevd
    if ! "$udevd" --daemon; then
        echo "vm: cannot start systemd-udevd" >"$RES/output.log"
        echo 125 >"$RES/rc"
        exit 0
    fi
    udevadm trigger --type=subsystems --action=add
    udevadm trigger --type=devices --action=add
    udevadm settle --timeout=60 || log "udevadm settle timed out"
fi

rc=0
env -i /bin/bash "$RES/cmd.sh" </dev/null >"$RES/output.log" 2>&1 || rc=$?
sync
echo "$rc" >"$RES/rc.tmp"
mv "$RES/rc.tmp" "$RES/rc"
sync
