#!/bin/sh
# PID 1 of the test VM (busybox sh inside the initramfs built by prepare.sh).
#
# It mounts the host's root (9p, read-only) at /newroot, gives it proc/sys/dev, loads the
# kernel modules with the host's modprobe from the unpacked kernel tree, lays tmpfs over the
# paths tests write to, mounts the read-write results share LAST (tmpfs mounts would hide it),
# then runs tests/vm/guest-run.sh in the chroot and powers off. It never reboots: any failure
# ends in poweroff so QEMU exits, and the host reads what happened from the results share and
# the serial log.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
/bin/busybox --install -s /bin

R=/newroot
RES=/res
P9='trans=virtio,version=9p2000.L,msize=262144'

log() {
    read -r up _ </proc/uptime
    echo "vm-init[$up]: $*"
}
halt_now() {
    sync
    umount "$R/run/volcrypt-vm" 2>/dev/null
    umount "$RES" 2>/dev/null
    poweroff -f
    sleep 5
    echo o >/proc/sysrq-trigger
}
fail() {
    log "FATAL: $*"
    echo "$*" >>"$RES/init-error" 2>/dev/null
    halt_now
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

while read -r m; do
    insmod "/lib/modules/$m" || fail "insmod $m"
done </modules.order

log "boot modules loaded"
mount -t 9p -o "$P9" vmres "$RES" || fail "cannot mount the results share"
echo booted >"$RES/booted"
# Written by run.sh: VM_KROOT, VM_RUNNER, VM_MODULES, VM_OPT_MODULES, VM_TMP_SIZE, VM_NET,
# VM_RW_DIRS.
. "$RES/config" || fail "cannot read $RES/config"

# The host root changes only between runs, so the guest may cache it (much faster exec/stat).
mount -t 9p -o "$P9,ro,cache=loose" hostroot "$R" || fail "cannot mount the host root"
mount -t proc proc "$R/proc" || fail "mount proc"
mount -t sysfs sysfs "$R/sys" || fail "mount sysfs"
mount -t devtmpfs devtmpfs "$R/dev" || fail "mount devtmpfs"
mkdir -p "$R/dev/pts" "$R/dev/shm"
# What systemd would add to devtmpfs (bash process substitution needs /dev/fd).
ln -sf /proc/self/fd "$R/dev/fd"
ln -sf /proc/self/fd/0 "$R/dev/stdin"
ln -sf /proc/self/fd/1 "$R/dev/stdout"
ln -sf /proc/self/fd/2 "$R/dev/stderr"
ln -sf /proc/kcore "$R/dev/core"
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts "$R/dev/pts"
mount -t tmpfs -o mode=1777 tmpfs "$R/dev/shm"

log "host root mounted"
# Modules come from the kernel tree on the host, before tmpfs could hide it.
# One modprobe call per list: each exec of modprobe reads its indexes over 9p.
# shellcheck disable=SC2086
chroot "$R" /sbin/modprobe -a -d "$VM_KROOT" $VM_MODULES || fail "modprobe $VM_MODULES"
# shellcheck disable=SC2086
chroot "$R" /sbin/modprobe -a -q -d "$VM_KROOT" $VM_OPT_MODULES ||
    log "not all of the optional modules loaded: $VM_OPT_MODULES"
log "modules loaded"
mount -t tmpfs -o mode=0755,size=256m tmpfs "$R/run" || fail "tmpfs /run"
mount -t tmpfs -o "mode=1777,size=$VM_TMP_SIZE" tmpfs "$R/tmp" || fail "tmpfs /tmp"
mount -t tmpfs -o mode=1777,size=256m tmpfs "$R/var/tmp" || fail "tmpfs /var/tmp"
mount -t tmpfs -o mode=0755,size=256m tmpfs "$R/var/lib" || fail "tmpfs /var/lib"
mkdir -p "$R/run/volcrypt-vm" "$R/run/lock"
mount -o bind "$RES" "$R/run/volcrypt-vm" || fail "cannot mount the results share in the chroot"
i=0
for d in $VM_RW_DIRS; do
    mount -t 9p -o "$P9" "rw$i" "$R$d" || fail "cannot mount read-write share $d"
    i=$((i + 1))
done

ip link set lo up
if [ "$VM_NET" = 1 ]; then
    # QEMU user-mode network, restrict=on: only the guestfwd addresses lead anywhere.
    ip addr add 10.0.2.15/24 dev eth0 || fail "cannot configure eth0"
    ip link set eth0 up || fail "cannot bring up eth0"
fi

log "running the guest command"
chroot "$R" /bin/bash "$VM_RUNNER"
log "guest runner exited with $?"

# Stop whatever the test left running (udevd, daemons) so nothing holds the shares.
kill -TERM -1 2>/dev/null
sleep 0.3
kill -KILL -1 2>/dev/null
halt_now
