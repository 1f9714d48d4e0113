#!/usr/bin/env bash
# volcrypt in two parts. First the userspace image tools (no root or device-mapper needed):
# encrypt a sample disk image into a LUKS2 container, inspect it, check the key, decrypt it and
# compare with the original. Then the main job: the agent attaches an encrypted volume through
# the kernel's dm-crypt (scripts/demo-dmcrypt.sh), and the userspace engine decrypts the
# backing file and finds the bytes the kernel showed through the mapping. That part runs here on
# a loop device when this host has dm-crypt (as root), else in the QEMU VM of tests/vm/.
#
# Fast KDF settings keep the demo quick; real images should keep the defaults
# (argon2id, 2000 ms, up to 1 GiB), which is what `volcrypt image encrypt` uses unless told.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

if [ -n "${VOLCRYPT_BIN:-}" ]; then
  bin=$VOLCRYPT_BIN # an already built binary (e.g. from CI)
else
  step "build the release binary"
  cargo build --release --bin volcrypt
  bin=${CARGO_TARGET_DIR:-target}/release/volcrypt
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/volcrypt-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT
t0=$SECONDS

step "make a random 8 MiB sample image: $work/plain.img"
head -c $((8 << 20)) /dev/urandom > "$work/plain.img"

step "write a passphrase key file (read whole, no newline stripping, as cryptsetup)"
# Generated here so no passphrase sits on a command line; it never appears in any output.
( umask 077; head -c 24 /dev/urandom | base64 | tr -d '\n' > "$work/passphrase" )

step "encrypt: volcrypt image encrypt (LUKS2, aes-xts-plain64, 512-bit key, argon2id)"
"$bin" image encrypt "$work/plain.img" --output "$work/encrypted.luks" \
  --key-file "$work/passphrase" --pbkdf argon2id --pbkdf-iterations 4 --pbkdf-memory 65536 \
  --label volcrypt-demo
ls -l "$work/plain.img" "$work/encrypted.luks"

step "inspect: volcrypt image inspect"
"$bin" image inspect "$work/encrypted.luks"

step "check the key: volcrypt image check-key"
"$bin" image check-key "$work/encrypted.luks" --key-file "$work/passphrase"

step "a wrong key is refused with cryptsetup's exit code 2"
printf 'wrong' > "$work/wrong"
rc=0
"$bin" image check-key "$work/encrypted.luks" --key-file "$work/wrong" || rc=$?
echo "exit code: $rc"
[ "$rc" -eq 2 ]

step "decrypt: volcrypt image decrypt"
"$bin" image decrypt "$work/encrypted.luks" --key-file "$work/passphrase" --output "$work/decrypted.img"

step "compare with the original"
cmp "$work/plain.img" "$work/decrypted.img"
echo "decrypted image is byte-identical to the original ($(stat -c %s "$work/decrypted.img") bytes)"

if command -v cryptsetup >/dev/null 2>&1; then
  step "cross-check with cryptsetup: the passphrase opens the container"
  cryptsetup open --test-passphrase --key-file "$work/passphrase" "$work/encrypted.luks"
  echo "cryptsetup accepts the passphrase"
fi

# --- the main job: an encrypted volume attached through dm-crypt --------------------------------
repo=$(pwd)
vm=""
if [ "$(id -u)" -ne 0 ]; then
  echo "the dm-crypt part needs root; skipping it (run make demo as root)" >&2
  exit 1
fi
modprobe -q dm_crypt 2>/dev/null || true
if ! dmsetup targets 2>/dev/null | grep -q '^crypt'; then vm=1; fi
mkdir -p "$repo/.work"
dm=$(mktemp -d "$repo/.work/demo-dm.XXXXXX")
trap 'rm -rf "$work" "$dm"' EXIT
# The VM mounts its own tmpfs over /tmp: give it copies in a directory it shares read-write.
cp "$bin" "$dm/volcrypt"; cp scripts/demo-dmcrypt.sh "$dm/"
if [ -n "$vm" ]; then
  case $repo in
    /tmp/*|/var/tmp/*|/var/lib/*|/run/*) export VOLCRYPT_VM_DIR=${VOLCRYPT_VM_DIR:-/var/cache/volcrypt/vm} ;;
  esac
  step "this host's kernel has no dm-crypt: the next steps run in a QEMU VM (tests/vm/run.sh: Debian's kernel, this host's programs)"
  if [ ! -d "${VOLCRYPT_VM_DIR:-$repo/.work/vm}" ]; then
    echo "first run: preparing the VM (Debian's kernel package and a small initramfs, about a minute, once)"
  fi
  echo "(the VM emulates its CPU, so each step is slower than on real hardware)"
  (cd "$dm" && "$repo/tests/vm/run.sh" --rw "$dm" --timeout 600 -- "$dm/demo-dmcrypt.sh" "$dm/volcrypt" "$dm")
else
  step "this host has dm-crypt: the next steps run here, on a loop device"
  "$dm/demo-dmcrypt.sh" "$dm/volcrypt" "$dm"
fi

step "userspace: volcrypt image decrypt on the backing file (the key's hex, as the kernel got it)"
"$bin" image decrypt "$dm/disk.img" --key-file "$dm/key.bin" --secret-type symmetric --output "$dm/plain.img"
echo "decrypted: sha256 $(sha256sum <"$dm/plain.img" | cut -c1-16)…  kernel mapping: sha256 $(cut -c1-16 "$dm/mapped.sha256")…"
[ "$(sha256sum <"$dm/plain.img" | cut -d' ' -f1)" = "$(cat "$dm/mapped.sha256")" ]
echo "the kernel (dm-crypt) and volcrypt's userspace engine agree on every byte"
echo "hello.txt read from the decrypted file system: $(debugfs -R 'cat /hello.txt' "$dm/plain.img" 2>/dev/null)"

step "done in $((SECONDS - t0)) s"
