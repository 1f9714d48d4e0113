#!/usr/bin/env bash
# `image verify --plaintext` benchmark (natively, no root): a SIZE MiB random image is encrypted
# by volcrypt (LUKS2 defaults, PBKDF2 1000 iterations so the unlock is negligible), decrypted
# once to a file, then timed in the same run:
#   reference: `cmp` of the decrypted output against the plaintext (both files in the page cache);
#   volcrypt:  `volcrypt image verify --plaintext` (decrypts the payload and compares it).
# Prints the medians of ROUNDS alternating runs and the ratio reference/volcrypt (goal: >= 0.8x). A
# benchmark, not a test: it fails on errors only, never on the ratio.
#
#   scripts/bench-image-verify.sh [SIZE_MIB] [ROUNDS]   (VOLCRYPT_BENCH_PROFILE=debug: no --release)
set -euo pipefail
cd "$(dirname "$0")/.."

size=${1:-256}
rounds=${2:-7}
profile=${VOLCRYPT_BENCH_PROFILE:-release}
target=${CARGO_TARGET_DIR:-$PWD/target}
if [[ $profile == release ]]; then
    cargo build --release --bin volcrypt
else
    cargo build --bin volcrypt
fi
bin=$target/$profile/volcrypt
[[ -x $bin ]] || { echo "bench-image-verify: $bin not built" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
head -c "$((size << 20))" /dev/urandom > "$tmp/plain.raw"
printf 'bench passphrase' > "$tmp/pass"
"$bin" image encrypt "$tmp/plain.raw" --output "$tmp/disk.luks" --key-file "$tmp/pass" \
    --pbkdf pbkdf2 --pbkdf-iterations 1000
"$bin" image decrypt "$tmp/disk.luks" --key-file "$tmp/pass" --output "$tmp/decrypted.raw"

# Wall time of one run of a command, in seconds.
wall() {
    local t0 t1
    t0=$(date +%s.%N)
    "$@" > /dev/null
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
cat "$tmp"/*.raw "$tmp/disk.luks" > /dev/null   # warm the page cache for both sides
# The two commands run in turn (one pair per round), so a noisy neighbour slows both alike;
# the ratio is the median of the per-pair ratios.
refs=() vers=() ratios=()
for _ in $(seq "$rounds"); do
    r=$(wall cmp "$tmp/decrypted.raw" "$tmp/plain.raw")
    v=$(wall "$bin" image verify "$tmp/disk.luks" --key-file "$tmp/pass" --plaintext "$tmp/plain.raw")
    refs+=("$r") vers+=("$v") ratios+=("$(echo "$r / $v" | bc -l)")
done
ref=$(printf '%s\n' "${refs[@]}" | median)
ver=$(printf '%s\n' "${vers[@]}" | median)
ratio=$(printf '%s\n' "${ratios[@]}" | median)
printf 'bench-image-verify: %d MiB, median of %d alternating rounds (%s build)\n' "$size" "$rounds" "$profile"
printf '  cmp decrypted plaintext:           %8.3f s  (%7.1f MiB/s)\n' "$ref" "$(echo "$size / $ref" | bc -l)"
printf '  volcrypt image verify --plaintext: %8.3f s  (%7.1f MiB/s)\n' "$ver" "$(echo "$size / $ver" | bc -l)"
printf '  ratio cmp/verify: %.2fx (goal >= 0.8x)\n' "$ratio"
