#!/usr/bin/env bash
# Boot Debian's kernel under QEMU (TCG), run one command as root in a chroot on the host's own
# root filesystem (shared read-only over 9p) against a real device-mapper/dm-crypt, loop
# devices and optionally udevd; print its output and exit with its exit code.
#
# Usage: tests/vm/run.sh [options] -- CMD [ARGS...]
#   --udev                 start systemd-udevd in the guest (otherwise DM_DISABLE_UDEV=1)
#   --forward GIP:GPORT=127.0.0.1:HPORT
#                          guest TCP connections to GIP:GPORT (in 10.0.2.0/24) reach the host's
#                          127.0.0.1:HPORT; repeatable. Enables the guest's eth0 (10.0.2.15/24).
#   --env NAME=VALUE       set a variable in the command's environment (repeatable);
#   --env NAME             copy it from the caller's environment
#   --rw DIR               mount host directory DIR read-write at the same path (repeatable)
#   --module MOD           load an extra kernel module at boot (repeatable)
#   --without-module MOD   do not load MOD at boot, even a required one (repeatable): for the
#                          self-test that proves the tests fail without, e.g., dm_crypt
#   --timeout SECS         kill the VM after SECS seconds (default 600)
#   --mem MB               guest memory (default 1024); /tmp in the guest gets half of it
#
# Exit status: the command's own status, or
#   124  the VM timed out (QEMU killed),
#   125  the harness or the VM failed (did not boot, died, bad arguments).
# The guest sees the host's files read-only at the same paths; it can write to tmpfs on /tmp,
# /var/tmp, /var/lib, /run and /dev/shm, and to --rw directories. The command runs in the
# caller's current directory. Serial console: $VOLCRYPT_VM_DIR/runs/<id>/serial.log (kept
# when a run fails; the last one is also copied to $VOLCRYPT_VM_DIR/last-serial.log).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
export VOLCRYPT_VM_DIR=${VOLCRYPT_VM_DIR:-$REPO/.work/vm}

EXIT_TIMEOUT=124
EXIT_HARNESS=125

die() { echo "vm-run: error: $*" >&2; exit "$EXIT_HARNESS"; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit "$EXIT_HARNESS"; }

UDEV=0
TIMEOUT=600
MEM=1024
FORWARDS=()
ENVS=()
RW_DIRS=()
EXTRA_MODULES=()
WITHOUT_MODULES=()
while (($#)); do
    case $1 in
        --udev) UDEV=1; shift ;;
        --forward) (($# >= 2)) || usage; FORWARDS+=("$2"); shift 2 ;;
        --env) (($# >= 2)) || usage; ENVS+=("$2"); shift 2 ;;
        --rw) (($# >= 2)) || usage; RW_DIRS+=("$2"); shift 2 ;;
        --module) (($# >= 2)) || usage; EXTRA_MODULES+=("$2"); shift 2 ;;
        --without-module) (($# >= 2)) || usage; WITHOUT_MODULES+=("$2"); shift 2 ;;
        --timeout) (($# >= 2)) || usage; TIMEOUT=$2; shift 2 ;;
        --mem) (($# >= 2)) || usage; MEM=$2; shift 2 ;;
        --) shift; break ;;
        -h|--help) usage ;;
        *) die "unknown option '$1' (the command goes after --)" ;;
    esac
done
(($#)) || die "no command given (usage: run.sh [options] -- CMD [ARGS...])"
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive number of seconds, got '$TIMEOUT'"
[[ $MEM =~ ^[1-9][0-9]*$ ]] && ((MEM >= 512)) || die "--mem must be at least 512 (MiB), got '$MEM'"

# --- network: QEMU user mode with restrict=on, nothing but guestfwd to host loopback --------
NETDEV=""
BUSYBOX=$(command -v busybox || echo /bin/busybox)
for f in "${FORWARDS[@]}"; do
    [[ $f =~ ^10\.0\.2\.([0-9]{1,3}):([0-9]{1,5})=127\.0\.0\.1:([0-9]{1,5})$ ]] ||
        die "bad --forward '$f' (expected 10.0.2.X:PORT=127.0.0.1:PORT)"
    oct=${BASH_REMATCH[1]} gport=${BASH_REMATCH[2]} hport=${BASH_REMATCH[3]}
    ((oct >= 4 && oct <= 254 && oct != 15)) ||
        die "bad --forward '$f': 10.0.2.$oct is reserved (use 10.0.2.4-254, not .15)"
    ((gport >= 1 && gport <= 65535 && hport >= 1 && hport <= 65535)) || die "bad port in --forward '$f'"
    # cmd: spawns one relay per guest connection (a chardev target would carry only one
    # connection for the VM's whole life, which breaks HTTP clients that reconnect).
    NETDEV+=",guestfwd=tcp:10.0.2.$oct:$gport-cmd:$BUSYBOX nc 127.0.0.1 $hport"
done

for n in "${!ENVS[@]}"; do
    e=${ENVS[$n]}
    if [[ $e =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
        [[ -v $e ]] || die "--env $e: not set in the caller's environment"
        ENVS[$n]="$e=${!e}"
    elif [[ ! $e =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
        die "bad --env '$e' (expected NAME=VALUE or NAME)"
    fi
done
for n in "${!RW_DIRS[@]}"; do
    d=${RW_DIRS[$n]}
    [[ -d $d ]] || die "--rw $d: not a directory"
    d=$(cd "$d" && pwd -P)
    [[ $d != / && ! $d =~ [[:space:],] ]] || die "--rw $d: path must not be / or contain spaces or commas"
    RW_DIRS[$n]=$d
done
for m in "${EXTRA_MODULES[@]}" "${WITHOUT_MODULES[@]}"; do
    [[ $m =~ ^[A-Za-z0-9_-]+$ ]] || die "bad --module/--without-module '$m'"
done

# A checkout under a path the guest covers with tmpfs (a CI clone in /tmp, say) would hide this
# harness and the test binaries: share the checkout read-write at its own path instead.
REPO_DIR=$(cd "$HERE/../.." && pwd -P)
case $REPO_DIR/ in
    /tmp/*|/var/tmp/*|/var/lib/*|/run/*)
        repo_shared=0
        for d in "${RW_DIRS[@]}"; do [[ $REPO_DIR/ == "$d"/* ]] && repo_shared=1; done
        ((repo_shared)) || RW_DIRS+=("$REPO_DIR") ;;
esac

CWD=$(pwd -P)
cwd_shared=0
for d in "${RW_DIRS[@]}"; do [[ $CWD/ == "$d"/* ]] && cwd_shared=1; done
case $CWD/ in
    /tmp/*|/var/tmp/*|/var/lib/*|/run/*)
        ((cwd_shared)) || die "current directory $CWD is hidden by a tmpfs in the guest; run from elsewhere or --rw it" ;;
esac

VOLCRYPT_VM_QUIET=1 "$HERE/prepare.sh" || die "tests/vm/prepare.sh failed"
VM_DIR=$(cd "$VOLCRYPT_VM_DIR" && pwd -P)
[[ ! $VM_DIR =~ [,[:space:]] ]] || die "VOLCRYPT_VM_DIR '$VM_DIR' must not contain commas or spaces (QEMU option syntax)"
KROOT=$(readlink -f "$VM_DIR/kernel")
[[ $KROOT != /tmp/* && $KROOT != /var/tmp/* && $KROOT != /run/* && $KROOT != /var/lib/* ]] ||
    die "VOLCRYPT_VM_DIR must not be under /tmp, /var/tmp, /var/lib or /run (the guest hides them)"

# Prefer the uncompressed kernel (PVH boot, see prepare.sh); VOLCRYPT_VM_BZIMAGE=1 forces the
# bzImage.
KERNEL_IMAGE=$VM_DIR/vmlinuz
[[ -e $VM_DIR/vmlinux && -z ${VOLCRYPT_VM_BZIMAGE:-} ]] && KERNEL_IMAGE=$VM_DIR/vmlinux
mkdir -p "$VM_DIR/runs"
# Failed runs are kept for inspection; drop those older than a day.
find "$VM_DIR/runs" -mindepth 1 -maxdepth 1 -name 'run.*' -mmin +1440 -exec rm -rf {} + 2>/dev/null || true
RUN=$(mktemp -d "$VM_DIR/runs/run.XXXXXX")
SHARE=$RUN/share
mkdir -p "$SHARE"

QPID=""
TPID=""
KEEP_RUN=1
cleanup() {
    local st=$?
    if [[ -n $QPID ]] && kill -0 "$QPID" 2>/dev/null; then
        kill -TERM "$QPID" 2>/dev/null || true
        sleep 0.5
        kill -KILL "$QPID" 2>/dev/null || true
        wait "$QPID" 2>/dev/null || true
    fi
    if [[ -n $TPID ]] && kill -0 "$TPID" 2>/dev/null; then
        kill "$TPID" 2>/dev/null || true
        wait "$TPID" 2>/dev/null || true
    fi
    [[ -f $RUN/serial.log ]] && cp "$RUN/serial.log" "$VM_DIR/last-serial.log" 2>/dev/null
    if ((KEEP_RUN == 0)) && [[ -z ${VOLCRYPT_VM_KEEP:-} ]]; then rm -rf "$RUN"; fi
    exit "$st"
}
trap cleanup EXIT
trap 'echo "vm-run: interrupted" >&2; exit 130' INT
trap 'exit 143' TERM

# --- what the guest runs ----------------------------------------------------------------------
MODULES="dm_mod dm_crypt loop"
# aesni_intel/xts for aes-xts, cbc/essiv for cryptsetup's plain and LUKS1 defaults, af_alg +
# algif_* because libcryptsetup uses the kernel crypto API for keyslots, ext4 to mount test
# filesystems.
OPT_MODULES="aesni_intel xts cbc essiv sha256_ssse3 af_alg algif_skcipher algif_hash ext4 crc32c_generic virtio_rng ${EXTRA_MODULES[*]}"
NET=0
if [[ -n $NETDEV ]]; then NET=1; OPT_MODULES="virtio_net $OPT_MODULES"; fi
[[ -n $NETDEV ]] && MODULES="$MODULES virtio_net"
without() { local m out=""; for m in $1; do [[ " ${WITHOUT_MODULES[*]} " == *" $m "* ]] || out+="$m "; done; echo "${out% }"; }
if ((${#WITHOUT_MODULES[@]})); then
    MODULES=$(without "$MODULES")
    OPT_MODULES=$(without "$OPT_MODULES")
    echo "vm-run: not loading ${WITHOUT_MODULES[*]} (--without-module)" >&2
fi
{
    printf 'VM_KROOT=%q\n' "$KROOT"
    printf 'VM_RUNNER=%q\n' "$HERE/guest-run.sh"
    printf 'VM_MODULES=%q\n' "$MODULES"
    printf 'VM_OPT_MODULES=%q\n' "$OPT_MODULES"
    printf 'VM_TMP_SIZE=%q\n' "$((MEM / 2))m"
    printf 'VM_NET=%q\n' "$NET"
    printf 'VM_UDEV=%q\n' "$UDEV"
    printf 'VM_RW_DIRS=%q\n' "${RW_DIRS[*]}"
} >"$SHARE/config"
{
    echo '# generated by tests/vm/run.sh'
    printf 'export PATH=%q\n' "$PATH"
    printf 'export HOME=%q\n' "${HOME:-/root}"
    echo 'export USER=root LOGNAME=root TERM=dumb LANG=C.UTF-8 TMPDIR=/tmp VOLCRYPT_VM=1'
    printf 'export VOLCRYPT_VM_MODULES_ROOT=%q\n' "$KROOT"
    if ((UDEV)); then
        echo 'export SYSTEMD_IGNORE_CHROOT=1'
    else
        # No udevd: libdevmapper creates the /dev/mapper nodes itself.
        echo 'export DM_DISABLE_UDEV=1'
    fi
    for e in "${ENVS[@]}"; do printf 'export %s=%q\n' "${e%%=*}" "${e#*=}"; done
    printf 'cd -- %q || { echo "vm: cannot cd to %q in the guest" >&2; exit 125; }\n' "$CWD" "$CWD"
    printf 'exec'
    printf ' %q' "$@"
    printf '\n'
} >"$SHARE/cmd.sh"

# cryptomgr.notests: the kernel's crypto self-tests only slow module loading under TCG; what we
# test is our use of dm-crypt, and smoke.sh checks data round-trips anyway.
QEMU=(qemu-system-x86_64
    -machine q35,accel=tcg -cpu max -m "$MEM" -smp 2
    -nodefaults -no-user-config -display none -monitor none -no-reboot
    -kernel "$KERNEL_IMAGE" -initrd "$VM_DIR/initrd.img"
    -append "console=ttyS0 quiet panic=-1 loglevel=4 cryptomgr.notests=1"
    -serial "file:$RUN/serial.log"
    -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
    -virtfs "local,path=$SHARE,mount_tag=vmres,security_model=none"
    -device virtio-rng-pci)
i=0
for d in "${RW_DIRS[@]}"; do
    QEMU+=(-virtfs "local,path=$d,mount_tag=rw$i,security_model=none,multidevs=remap")
    i=$((i + 1))
done
if [[ -n $NETDEV ]]; then
    QEMU+=(-netdev "user,id=n0,restrict=on,ipv6=off$NETDEV" -device virtio-net-pci,netdev=n0)
else
    QEMU+=(-nic none)
fi

START=$(date +%s.%N)
"${QEMU[@]}" </dev/null >"$RUN/qemu.log" 2>&1 &
QPID=$!
# Stream the command's output as the guest writes it (9p writes reach the host file directly).
tail -n +1 -s 0.2 -F --pid="$QPID" "$SHARE/output.log" 2>/dev/null &
TPID=$!

TIMED_OUT=0
deadline=$(($(date +%s) + TIMEOUT))
while kill -0 "$QPID" 2>/dev/null; do
    if (($(date +%s) >= deadline)); then
        TIMED_OUT=1
        kill -TERM "$QPID" 2>/dev/null || true
        sleep 1
        kill -KILL "$QPID" 2>/dev/null || true
        break
    fi
    sleep 0.2
done
qrc=0
wait "$QPID" 2>/dev/null || qrc=$?
QPID=""
wait "$TPID" 2>/dev/null || true
TPID=""
ELAPSED=$(awk -v a="$START" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')

show_failure() {
    echo "vm-run: $1" >&2
    echo "vm-run: QEMU exit status $qrc; run dir kept: $RUN" >&2
    if [[ -s $RUN/qemu.log ]]; then echo "--- qemu output ---" >&2; tail -n 20 "$RUN/qemu.log" >&2; fi
    [[ -s $SHARE/init-error ]] && { echo "--- guest init error ---" >&2; cat "$SHARE/init-error" >&2; }
    echo "--- serial console (tail) ---" >&2
    tail -n 40 "$RUN/serial.log" >&2 2>/dev/null || echo "(no serial log)" >&2
}

if ((TIMED_OUT)); then
    show_failure "timed out after ${TIMEOUT}s; QEMU killed"
    exit "$EXIT_TIMEOUT"
fi
if [[ ! -f $SHARE/booted ]]; then
    show_failure "the VM failed to boot (never reached its init)"
    exit "$EXIT_HARNESS"
fi
if [[ ! -f $SHARE/rc ]]; then
    show_failure "the VM stopped before the guest command finished"
    exit "$EXIT_HARNESS"
fi
rc=$(cat "$SHARE/rc")
[[ $rc =~ ^[0-9]+$ ]] || { show_failure "unreadable exit code '$rc'"; exit "$EXIT_HARNESS"; }
KEEP_RUN=0
[[ -n ${VOLCRYPT_VM_VERBOSE:-} ]] && echo "vm-run: guest command exited $rc; VM round ${ELAPSED}s" >&2
if ((rc != 0)); then
    echo "vm-run: guest command exited with status $rc (VM round ${ELAPSED}s)" >&2
fi
exit "$rc"
