#!/usr/bin/env bash
# Builds the Vagrant box the end-to-end stage boots, from Debian packages only (debootstrap from
# the mirror apt already uses), and caches it: nothing comes from Vagrant Cloud.
#
#   vagrant/build-box.sh            # prints the box file's path (builds it when missing)
#
# Cache: $VOLCRYPT_VAGRANT_DIR (default /var/cache/volcrypt/vagrant)/box-<hash>.box, where the
# hash covers this script, so editing the package list or the guest setup rebuilds the box.
# The guest is offline: everything a scenario runs in it (cryptsetup, e2fsprogs, curl, jq, the
# .deb's libraries) must be listed here.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${VOLCRYPT_VAGRANT_DIR:-/var/cache/volcrypt/vagrant}
mkdir -p "$cache"
hash=$(sha256sum "$here/build-box.sh" | cut -c1-12)
box="$cache/box-$hash.box"
log() { echo "build-box: $*" >&2; }

exec 9>"$cache/.build-box.lock"
flock 9
if [ -s "$box" ]; then echo "$box"; exit 0; fi

# The mirror apt uses (deb822 or one-line sources), so the box matches the host's packages.
mirror=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)
[ -n "$mirror" ] || mirror=$(grep -hsE '^deb .*debian/? bookworm' /etc/apt/sources.list | awk '{print $2}' | head -n1 || true)
mirror=${mirror:-http://deb.debian.org/debian}
for tool in debootstrap qemu-img mkfs.ext4; do
  command -v "$tool" >/dev/null || { log "$tool not found (scripts/install-deps.sh installs it)"; exit 1; }
done
pubkey=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n1)
[ -r "$pubkey" ] || { log "vagrant's insecure public key not found (is the vagrant package installed?)"; exit 1; }

t0=$SECONDS
tmp=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
root=$tmp/rootfs
log "debootstrap bookworm from $mirror (about 2-4 minutes the first time; cached afterwards)"
packages=(
  # boot, login, vagrant's needs
  systemd-sysv udev openssh-server sudo linux-image-cloud-amd64 qemu-guest-agent iproute2 rsync
  ca-certificates
  # what the scenarios run in the guest, and the .deb's libraries (the guest is offline)
  cryptsetup-bin dmsetup e2fsprogs util-linux kmod procps psmisc curl jq
  libcryptsetup12 libdevmapper1.02.1 libudev1 libblkid1
)
debootstrap --variant=minbase --include="$(IFS=,; echo "${packages[*]}")" \
  bookworm "$root" "$mirror" >"$tmp/debootstrap.log" 2>&1 \
  || { tail -n 30 "$tmp/debootstrap.log" >&2; exit 1; }
log "debootstrap done in $((SECONDS - t0)) s; configuring the guest"

echo volcrypt-e2e >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 volcrypt-e2e\n' >"$root/etc/hosts"
printf '/dev/vda / ext4 defaults,errors=remount-ro 0 1\n' >"$root/etc/fstab"
cat >"$root/etc/systemd/network/10-wired.network" <<'NET'
[Match]
Name=e*
[Network]
DHCP=ipv4
NET
chroot "$root" systemctl enable systemd-networkd ssh >/dev/null 2>&1
# Quiet, deterministic guest: no background jobs competing with the tests for the slow CPU.
chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
  e2scrub_reap.service fstrim.timer getty-static.service man-db.timer >/dev/null 2>&1 || true
chroot "$root" useradd -m -s /bin/bash -G sudo vagrant
install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
install -m 0600 -o 1000 -g 1000 "$pubkey" "$root/home/vagrant/.ssh/authorized_keys"
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$root/etc/sudoers.d/vagrant"
chmod 0440 "$root/etc/sudoers.d/vagrant"
printf 'UseDNS no\n' >"$root/etc/ssh/sshd_config.d/vagrant.conf"
# A persistent journal: scenarios read `journalctl -u volcrypt` across a reboot.
mkdir -p "$root/var/log/journal"
rm -f "$root"/var/cache/apt/archives/*.deb

kernel=$(ls "$root"/boot/vmlinuz-* | head -n1)
initrd=$(ls "$root"/boot/initrd.img-* | head -n1)
cp "$kernel" "$tmp/vmlinuz"; cp "$initrd" "$tmp/initrd.img"
grep -E '^CONFIG_(HOTPLUG_PCI_ACPI|DM_CRYPT|BLK_DEV_DM)=' "$root"/boot/config-* >&2 || true

log "ext4 image and qcow2"
truncate -s 4G "$tmp/raw.img"
mkfs.ext4 -q -d "$root" -L root "$tmp/raw.img"
qemu-img convert -c -O qcow2 "$tmp/raw.img" "$tmp/box.img"
rm -f "$tmp/raw.img"
printf '{"provider":"libvirt","format":"qcow2","virtual_size":4}\n' >"$tmp/metadata.json"
cat >"$tmp/Vagrantfile" <<'VF'
# Box defaults: direct kernel boot of the Debian kernel shipped inside the box.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.kernel = File.join(File.dirname(__FILE__), "vmlinuz")
    lv.initrd = File.join(File.dirname(__FILE__), "initrd.img")
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 quiet"
  end
end
VF
tar -C "$tmp" -cf "$tmp/out.box" metadata.json box.img vmlinuz initrd.img Vagrantfile
mv "$tmp/out.box" "$box"
# Older boxes of this builder are superseded.
find "$cache" -maxdepth 1 -name 'box-*.box' ! -name "box-$hash.box" -delete
log "box built in $((SECONDS - t0)) s: $box ($(du -h "$box" | cut -f1))"
echo "$box"
