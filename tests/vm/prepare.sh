#!/usr/bin/env bash
# Prepare, idempotently, what tests/vm/run.sh boots: Debian's own kernel (unpacked from the
# linux-image package, with depmod run on its modules) and a tiny busybox initramfs that can
# mount the host's root over 9p. Everything is cached under $VOLCRYPT_VM_DIR
# (default: $REPO/.work/vm); a warm run only checks stamps and takes well under a second.
#
# Why Debian's kernel under QEMU: the build hosts' kernel has no device-mapper and cannot load
# modules, so real dm-crypt is only reachable inside a VM (see
# shared/reference/vm-testing-notes.md).
#
# Environment:
#   VOLCRYPT_VM_DIR         cache/work dir (default $REPO/.work/vm)
#   VOLCRYPT_VM_KERNEL_PKG  kernel package (default: what linux-image-amd64 depends on)
#   VOLCRYPT_VM_QUIET=1     print nothing on success
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VM_DIR=${VOLCRYPT_VM_DIR:-$REPO/.work/vm}
QUIET=${VOLCRYPT_VM_QUIET:-0}

say() { [[ $QUIET == 1 ]] || echo "vm-prepare: $*" >&2; }
die() { echo "vm-prepare: error: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root (installs packages, builds an initramfs)"
mkdir -p "$VM_DIR"
VM_DIR=$(cd "$VM_DIR" && pwd)

# Several callers (attach tests, serve tests, the integrator) may prepare at the same time.
exec 9>"$VM_DIR/.prepare.lock"
flock 9

# --- 1. host packages ------------------------------------------------------------------------
# Host userland is what the guest runs (shared read-only over 9p), so the guest's tools are
# exactly these packages.
PACKAGES=(qemu-system-x86 cpio kmod busybox-static udev dmsetup cryptsetup e2fsprogs fdisk
          xz-utils util-linux)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- 2. kernel -------------------------------------------------------------------------------
if [[ -n ${VOLCRYPT_VM_KERNEL_PKG:-} ]]; then
    KPKG=$VOLCRYPT_VM_KERNEL_PKG
elif [[ -s $VM_DIR/kernel.pkg ]] && [[ -z ${VOLCRYPT_VM_REFRESH:-} ]]; then
    # Keep the kernel we already have: a new point release in the apt lists must not force a
    # 70 MB download on every run. VOLCRYPT_VM_REFRESH=1 picks the current one again.
    KPKG=$(cat "$VM_DIR/kernel.pkg")
else
    KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null |
           awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
    [[ -n $KPKG ]] || die "cannot find the kernel package linux-image-amd64 depends on (apt-get update?)"
fi
[[ $KPKG =~ ^linux-image-([0-9][A-Za-z0-9.+~-]*)$ ]] || die "unexpected kernel package name '$KPKG'"
KVER=${BASH_REMATCH[1]}
KROOT=$VM_DIR/kernel-$KVER

if [[ ! -f $KROOT/.complete ]]; then
    mkdir -p "$VM_DIR/debs"
    deb=$(ls "$VM_DIR/debs/${KPKG}"_*.deb 2>/dev/null | head -n1 || true)
    if [[ -z $deb ]]; then
        say "downloading $KPKG"
        if ! (cd "$VM_DIR/debs" && apt-get download -qq -o APT::Sandbox::User=root "$KPKG"); then
            say "download failed; refreshing apt lists and retrying"
            apt-get update -qq
            (cd "$VM_DIR/debs" && apt-get download -qq -o APT::Sandbox::User=root "$KPKG")
        fi
        deb=$(ls "$VM_DIR/debs/${KPKG}"_*.deb | head -n1)
    fi
    say "unpacking $(basename "$deb")"
    rm -rf "$KROOT"
    mkdir -p "$KROOT"
    dpkg-deb -x "$deb" "$KROOT"
    # The package ships no modules.dep (its postinst runs depmod); modprobe needs it.
    depmod -b "$KROOT" "$KVER"
    [[ -f $KROOT/boot/vmlinuz-$KVER ]] || die "no vmlinuz-$KVER in $deb"
    touch "$KROOT/.complete"
fi
echo "$KPKG" >"$VM_DIR/kernel.pkg.tmp" && mv "$VM_DIR/kernel.pkg.tmp" "$VM_DIR/kernel.pkg"

# --- 3. initramfs ----------------------------------------------------------------------------
# Only what it takes to reach the host root over virtio-9p. Every other module (dm_crypt,
# loop, ext4, ...) is loaded in the guest by the host's own modprobe from $KROOT, shared over
# 9p, which resolves dependencies and soft dependencies the same way.
BOOT_MODULES=(virtio_pci 9pnet_virtio 9p)
INIT_SRC=$HERE/guest-init.sh
BUSYBOX=$(command -v busybox)
file_is_static() { ! LC_ALL=C ldd "$1" >/dev/null 2>&1; }
file_is_static "$BUSYBOX" || BUSYBOX=/bin/busybox
file_is_static "$BUSYBOX" || die "$BUSYBOX is not static (install busybox-static)"

stamp=$( { echo "$KVER"; echo "${BOOT_MODULES[*]}"; cat "$INIT_SRC" "$BUSYBOX" "${BASH_SOURCE[0]}"; } |
         sha256sum | cut -d' ' -f1)
INITRD=$VM_DIR/initrd-$KVER.img
if [[ ! -f $INITRD || $(cat "$VM_DIR/initrd.stamp" 2>/dev/null) != "$stamp" ]]; then
    say "building initramfs"
    stage=$(mktemp -d "$VM_DIR/initrd-stage.XXXXXX")
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage"/{bin,dev,proc,sys,newroot,res,lib/modules}
    cp "$BUSYBOX" "$stage/bin/busybox"
    ln -s busybox "$stage/bin/sh"
    install -m 0755 "$INIT_SRC" "$stage/init"
    : >"$stage/modules.order"
    for m in "${BOOT_MODULES[@]}"; do
        # Lines look like "insmod /path/x.ko[.xz] [params]" or "builtin x": keep file order,
        # which lists dependencies before their users.
        modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" |
        while read -r kind path _; do
            [[ $kind == insmod ]] || continue
            name=$(basename "$path"); name=${name%.xz}; name=${name%.zst}; name=${name%.gz}
            grep -qx "$name" "$stage/modules.order" && continue
            case $path in
                *.xz) xz -dc "$path" >"$stage/lib/modules/$name" ;;
                *.zst) zstd -qdc "$path" >"$stage/lib/modules/$name" ;;
                *.gz) gzip -dc "$path" >"$stage/lib/modules/$name" ;;
                *) cp "$path" "$stage/lib/modules/$name" ;;
            esac
            echo "$name" >>"$stage/modules.order"
        done
    done
    (cd "$stage" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc --quiet -R 0:0) | gzip -1 >"$INITRD.tmp"
    mv "$INITRD.tmp" "$INITRD"
    echo "$stamp" >"$VM_DIR/initrd.stamp"
    rm -rf "$stage"
    trap - EXIT
fi

ln -sfn "kernel-$KVER/boot/vmlinuz-$KVER" "$VM_DIR/vmlinuz"
ln -sfn "initrd-$KVER.img" "$VM_DIR/initrd.img"
ln -sfn "kernel-$KVER" "$VM_DIR/kernel"
say "ready: kernel $KVER in $VM_DIR"
