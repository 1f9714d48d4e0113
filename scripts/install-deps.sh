#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages volcrypt's build, demo and tests need, when they are
# missing. Run as root (CI does); as another user it prints what is missing and fails.
set -euo pipefail

packages=(
  # build: libcryptsetup-rs, devicemapper, udev and libblkid-rs bindings (bindgen needs libclang)
  pkg-config libclang-dev libcryptsetup-dev libdevmapper-dev libudev-dev libblkid-dev libssl-dev
  # reference implementations the tests compare against
  cryptsetup-bin qemu-utils
  # the real-kernel VM stage
  qemu-system-x86 cpio kmod busybox-static udev dmsetup e2fsprogs fdisk
  # the Barbican test server's virtualenv
  python3-venv
  # `make deb`: cargo-deb computes Depends with dpkg-shlibdeps
  dpkg-dev
  # the demo's attach through the agent's socket
  curl jq
  # the Vagrant stage: vagrant-libvirt with a private libvirtd (no libvirt networks or
  # services: they come with libvirt-daemon-system, not installed), the box built by
  # debootstrap, a netns. (promtool is unpacked from Debian's prometheus package by
  # vagrant/run.sh, so no Prometheus server gets installed or started.)
  vagrant vagrant-libvirt libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients debootstrap
  iproute2
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages: ${missing[*]}" >&2
  echo "install-deps: run as root, or: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
