#!/bin/bash
# Guest-side smoke test of the VM harness: a real LUKS2 volume on a loop device through the
# kernel's dm-crypt. Run it with `tests/vm/run.sh [--udev] -- tests/vm/smoke.sh`.
# With udevd running (VOLCRYPT_VM_UDEV=1 from selftest.sh, or detected) it also checks the
# /dev/disk/by-id links udev makes for the dm device and the LUKS probe of the loop device.
set -euo pipefail

[[ ${VOLCRYPT_VM:-} == 1 ]] || { echo "smoke: run me inside the VM: tests/vm/run.sh -- $0" >&2; exit 2; }
step() { echo "smoke[${SECONDS}s]: $*"; }
udev=0
[[ -S /run/udev/control ]] && udev=1

work=$(mktemp -d /tmp/smoke.XXXXXX)
loop=""
cleanup() {
    cryptsetup close smoke 2>/dev/null || true
    [[ -n $loop ]] && losetup -d "$loop" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

step "kernel $(uname -r), udev=$udev, DM_DISABLE_UDEV=${DM_DISABLE_UDEV:-unset}"
grep -qw crypt <(dmsetup targets) || { echo "smoke: no crypt target in dmsetup targets" >&2; exit 1; }

truncate -s 64M "$work/disk.img"
loop=$(losetup --find --show "$work/disk.img")
step "loop device $loop"
printf '%s' 'smoke-test-passphrase' >"$work/pass"
cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --key-file "$work/pass" "$loop"
cryptsetup open --key-file "$work/pass" "$loop" smoke
[[ -b /dev/mapper/smoke ]] || { echo "smoke: /dev/mapper/smoke missing" >&2; exit 1; }
step "opened $(cryptsetup status smoke | awk '$1 == "cipher:" {print $2}')"

table=$(dmsetup table smoke)
# "0 <len> crypt <cipher> <key> <iv_offset> <dev> <offset> ...": field 5 is the key (a keyring
# reference or zeros without --showkeys); print the rest only.
read -r t_start t_len t_type t_cipher _ t_rest <<<"$table"
step "dmsetup table: $t_start $t_len $t_type $t_cipher <key hidden> $t_rest"
[[ $t_type == crypt && $t_cipher == aes-xts-plain64 ]] || { echo "smoke: unexpected table" >&2; exit 1; }

# Data through the mapping reads back byte-exact and is not stored in the clear.
head -c $((4 << 20)) /dev/urandom >"$work/data"
dd if="$work/data" of=/dev/mapper/smoke bs=1M oflag=direct conv=fsync status=none
echo 3 >/proc/sys/vm/drop_caches
cmp -n $((4 << 20)) "$work/data" /dev/mapper/smoke
offset=$(cryptsetup luksDump "$loop" | awk '$1 == "offset:" {print $2; exit}')
dd if="$loop" of="$work/raw" bs=1M skip="$offset" count=4 iflag=direct,skip_bytes status=none
if cmp -s "$work/data" "$work/raw"; then echo "smoke: data stored unencrypted" >&2; exit 1; fi
step "4 MiB written through /dev/mapper/smoke read back intact; ciphertext at offset $offset differs"

# A filesystem on top (ext4 module loaded in the guest).
mkfs.ext4 -q -F /dev/mapper/smoke
mkdir "$work/mnt"
mount /dev/mapper/smoke "$work/mnt"
echo hello >"$work/mnt/file"
umount "$work/mnt"
step "ext4 on the mapping mounted and written"

if ((udev)); then
    udevadm settle --timeout=30
    uuid=$(cryptsetup luksUUID "$loop")
    ls -l /dev/disk/by-id/ | grep -E 'dm-(name|uuid)-' || true
    [[ -L /dev/disk/by-id/dm-name-smoke ]] || { echo "smoke: no by-id/dm-name-smoke link" >&2; exit 1; }
    compgen -G "/dev/disk/by-id/dm-uuid-CRYPT-LUKS2-${uuid//-/}-smoke" >/dev/null ||
        { echo "smoke: no by-id/dm-uuid-CRYPT-LUKS2-*-smoke link" >&2; exit 1; }
    fstype=$(udevadm info --query=property --name="$loop" | sed -n 's/^ID_FS_TYPE=//p')
    [[ $fstype == crypto_LUKS ]] || { echo "smoke: udev says ID_FS_TYPE='$fstype' for $loop" >&2; exit 1; }
    step "udev: by-id links for the dm device present, $loop probed as crypto_LUKS"
fi

cryptsetup close smoke
[[ ! -e /dev/mapper/smoke ]] || { echo "smoke: /dev/mapper/smoke still there after close" >&2; exit 1; }
if ((udev)); then
    udevadm settle --timeout=30
    [[ ! -e /dev/disk/by-id/dm-name-smoke ]] || { echo "smoke: by-id link left after close" >&2; exit 1; }
fi
losetup -d "$loop"
loop=""
step "closed; OK"
