#!/usr/bin/env bash
# Fuzzes the LUKS header parser (fuzz/fuzz_targets/luks_header.rs) with libFuzzer through
# cargo-fuzz for SECONDS (default 60), on the stable toolchain the project builds with.
#
#   scripts/fuzz.sh [SECONDS]      e.g. `make fuzz FUZZ_SECONDS=3600` for a longer run
#
# cargo-fuzz passes the sanitizer flags (-Zsanitizer=address) that only nightly rustc
# accepts; stable rustc accepts them with RUSTC_BOOTSTRAP=1, set here for this build only
# (the product itself never uses unstable features). Installs what it needs (cargo-fuzz from
# crates.io, a C++ compiler for libFuzzer) on a fresh machine.
#
# A crash, a timeout or an out-of-memory input fails the run; libFuzzer keeps the input in
# fuzz/artifacts/luks_header/ (add it as a regression test in tests/luks_validation.rs).
# The corpus grows in fuzz/corpus/luks_header/, seeded with headers cryptsetup makes.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-${FUZZ_SECONDS:-60}}
case $seconds in ''|*[!0-9]*) echo "fuzz.sh: SECONDS must be a whole number, not '$seconds'" >&2; exit 2 ;; esac

if ! command -v c++ >/dev/null 2>&1; then
  echo "fuzz.sh: installing a C++ compiler (libFuzzer is C++)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz from crates.io"
  cargo install --locked cargo-fuzz
fi
if ! command -v cryptsetup >/dev/null 2>&1; then
  echo "fuzz.sh: cryptsetup is needed to make the seed headers (scripts/install-deps.sh installs it)" >&2
  exit 1
fi

corpus=fuzz/corpus/luks_header
mkdir -p "$corpus"
if [ -z "$(ls -A "$corpus")" ]; then
  # Seeds: real headers (both copies of LUKS2 plus the start of its keyslot area, and LUKS1),
  # so mutations start from valid metadata instead of having to discover the format.
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  fmt() { # name, cryptsetup options...
    local name=$1; shift
    truncate -s 4M "$tmp/$name"
    printf fuzz | cryptsetup luksFormat -q --key-file - --header "$tmp/$name" "$@" "$tmp/$name"
  }
  fmt luks2-pbkdf2 --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000
  fmt luks2-argon2 --type luks2 --pbkdf argon2id --pbkdf-force-iterations 4 --pbkdf-memory 32 --pbkdf-parallel 1 --sector-size 4096
  fmt luks1 --type luks1 --pbkdf-force-iterations 1000 --hash sha256
  head -c 65536 "$tmp/luks2-pbkdf2" > "$corpus/luks2-pbkdf2"
  head -c 65536 "$tmp/luks2-argon2" > "$corpus/luks2-argon2"
  head -c 65536 "$tmp/luks1" > "$corpus/luks1"
fi

echo "fuzz.sh: fuzzing the LUKS header parser for ${seconds}s"
RUSTC_BOOTSTRAP=1 cargo fuzz run luks_header "$corpus" -- \
  -max_total_time="$seconds" -max_len=65536 -timeout=20 -rss_limit_mb=2048 -print_final_stats=1
