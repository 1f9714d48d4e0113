#!/usr/bin/env bash
# volcrypt's main job in a few seconds: encrypt a sample disk image into a LUKS2 container
# (userspace, no root or device-mapper needed), inspect it, check the key, decrypt it and
# compare with the original.
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

step "done"
