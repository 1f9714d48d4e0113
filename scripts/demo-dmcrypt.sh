#!/usr/bin/env bash
# The kernel half of `make demo`: what volcrypt is for. Runs as root on a host with
# device-mapper (or inside the QEMU VM of tests/vm/, which scripts/demo.sh arranges):
#
#   scripts/demo-dmcrypt.sh VOLCRYPT_BINARY WORKDIR
#
# A blank disk (a loop device on WORKDIR/disk.img), a symmetric secret in a keystore, the agent
# (`volcrypt serve`) and the attach request an orchestrator sends it; the dm-crypt mapping it
# opens (table shown with the key field masked), an ext4 file system written through it, the
# detach. It leaves WORKDIR/disk.img (the encrypted backing file), WORKDIR/key.bin and
# WORKDIR/mapped.sha256 (what the kernel showed through the mapping) for the userspace check
# that scripts/demo.sh runs afterwards. Everything else (agent, loop device, mapping) is undone
# on exit, also on failure.
set -euo pipefail
bin=$1
dir=$2
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
export PATH=/usr/sbin:/sbin:$PATH

loop="" agent="" mnt=""
# The agent's socket, journal and keystore on a local tmpfs (/run): WORKDIR may be a 9p share
# (in the VM), where a Unix socket cannot be bound.
rt=$(mktemp -d /run/volcrypt-demo.XXXXXX)
cleanup() {
  set +e
  [ -n "$mnt" ] && mountpoint -q "$mnt" && umount "$mnt"
  dmsetup info crypt-demo-disk >/dev/null 2>&1 && cryptsetup close crypt-demo-disk
  if [ -n "$agent" ]; then kill "$agent" 2>/dev/null; wait "$agent" 2>/dev/null; fi
  [ -n "$loop" ] && losetup -d "$loop"
  rm -rf "$rt"
}
trap cleanup EXIT

step "a blank 48 MiB disk: $(
  truncate -s 48M "$dir/disk.img"
  loop=$(losetup --find --show "$dir/disk.img"); echo "$loop" >"$dir/loop"; echo "$loop")"
loop=$(cat "$dir/loop")
# What an orchestrator hands over: a stable path to the disk (os-brick uses /dev/disk/by-path).
ln -sfn "$loop" "$rt/demo-disk"

step "a 512-bit symmetric secret in the keystore (never printed; OpenStack derives the passphrase as its hex)"
( umask 077; head -c 64 /dev/urandom >"$dir/key.bin" )
"$bin" keystore --dir "$rt/keys" add 5b7c0a3e-demo --type symmetric --file "$dir/key.bin"
"$bin" keystore --dir "$rt/keys" list

step "start the agent: volcrypt serve (API on a Unix socket)"
cat >"$rt/volcrypt.toml" <<TOML
[server]
socket = "$rt/api.sock"
udev = false
[volume]
state_dir = "$rt/state"
by_id_dir = "$rt/by-id"
# A cheap KDF for the demo (real volumes keep libcryptsetup's benchmarked argon2id).
[volume.pbkdf]
kind = "pbkdf2"
iterations = 1000
[key_manager.keystore]
dir = "$rt/keys"
TOML
"$bin" --log-level warn serve --config "$rt/volcrypt.toml" 2>"$rt/agent.log" &
agent=$!
for _ in $(seq 300); do [ -S "$rt/api.sock" ] && break; sleep 0.2; done
[ -S "$rt/api.sock" ] || { cat "$rt/agent.log"; exit 1; }
api() { curl -sS --unix-socket "$rt/api.sock" -H 'Content-Type: application/json' "$@"; }
api http://localhost/v1/health | jq -c '{status, dm_crypt: .dm_crypt.ok}'

step "the attach request (what Nova hands os-brick), POST /v1/attachments"
cat >"$rt/request.json" <<JSON
{"volume_id": "demo-volume", "device_path": "$rt/demo-disk",
 "encryption": {"provider": "luks2", "control_location": "front-end",
                "cipher": "aes-xts-plain64", "key_size": 512, "encryption_key_id": "5b7c0a3e-demo"}}
JSON
jq -c . "$rt/request.json"
api --data-binary @"$rt/request.json" http://localhost/v1/attachments \
  | jq '{volume_id, device, formatted, format, derivation, stable_link}'

step "the dm-crypt mapping (dmsetup table, key field masked)"
dmsetup table crypt-demo-disk | awk '$3 == "crypt" { $5 = "<key masked>" } { print }'
echo "$rt/demo-disk -> $(readlink "$rt/demo-disk")   (os-brick's symlink now points at the mapping)"

step "an ext4 file system written through the mapping"
mkfs.ext4 -q -L demo /dev/mapper/crypt-demo-disk
mnt=$rt/mnt; mkdir -p "$mnt"
mount /dev/mapper/crypt-demo-disk "$mnt"
echo "written through dm-crypt by volcrypt's demo" >"$mnt/hello.txt"
head -c 1M /dev/urandom >"$mnt/random.bin"
sha256sum "$mnt/random.bin" | sed "s#$mnt/##"
umount "$mnt"
# What the kernel shows through the mapping: the userspace engine must find the same bytes.
sha256sum </dev/mapper/crypt-demo-disk | cut -d' ' -f1 >"$dir/mapped.sha256"
echo "plaintext seen through the mapping: sha256 $(cut -c1-16 "$dir/mapped.sha256")…"

step "detach: DELETE /v1/attachments/demo-volume"
api -X DELETE http://localhost/v1/attachments/demo-volume | jq -c '{volume_id, was_active}'
dmsetup info crypt-demo-disk >/dev/null 2>&1 && { echo "mapping still there" >&2; exit 1; }
echo "mapping closed; $rt/demo-disk -> $(readlink "$rt/demo-disk") again"
