#!/usr/bin/env bash
# Builds target/debian/volcrypt_<version>_amd64.deb with cargo-deb (installed from crates.io
# when missing: CI machines start fresh) and prints its path on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if ! cargo deb --version >/dev/null 2>&1; then
  echo "build-deb: installing cargo-deb (cargo install cargo-deb --locked; a few minutes once)" >&2
  cargo install cargo-deb --locked --quiet
fi
# The release build and the package; cargo-deb strips the binary and computes Depends from its
# shared libraries (dpkg-shlibdeps).
out=$(cargo deb --strip --quiet 2>&1 | tail -n1) || { echo "$out" >&2; exit 1; }
deb=$(ls -t target/debian/volcrypt_*_amd64.deb | head -n1)
[ -s "$deb" ] || { echo "build-deb: no package produced" >&2; exit 1; }
echo "build-deb: $(dpkg-deb -f "$deb" Package Version Depends | tr '\n' ' ')" >&2
readlink -f "$deb"
