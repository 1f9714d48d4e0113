#!/usr/bin/env bash
# `image convert` benchmark (natively, no root): a SIZE MiB random plaintext is encrypted by
# volcrypt into a qcow2-LUKS image (PBKDF2, 1000 iterations) and converted once to raw LUKS1
# (the only raw LUKS qemu-img 7.2 reads); then, in the same run, each direction is timed:
#   qcow2-LUKS -> raw LUKS:  `qemu-img convert ... -O luks`  vs  `volcrypt image convert`
#   raw LUKS -> qcow2-LUKS:  `qemu-img convert ... -O qcow2 -o encrypt.format=luks`
#                            vs  `volcrypt image convert --format qcow2`
# Both sides unlock a PBKDF2 keyslot of 1000 iterations and write a new keyslot cheaply
# (qemu-img: iter-time=10 ms; volcrypt: PBKDF2 1000 iterations), so the KDF does not dominate
# and the figures measure the data path. Sources and outputs live in /dev/shm when it has room
# (else TMPDIR; BENCH_DIR overrides); outputs are removed between rounds. Prints the best of ROUNDS for each and the
# ratio qemu-img/volcrypt per direction (goal: >= 3x). A benchmark, not a test: it fails on
# errors only, never on the ratio.
#
#   scripts/bench-image-convert.sh [SIZE_MIB] [ROUNDS]   (VOLCRYPT_BENCH_PROFILE=debug: no --release)
set -euo pipefail
cd "$(dirname "$0")/.."

size=${1:-1024}
rounds=${2:-3}
profile=${VOLCRYPT_BENCH_PROFILE:-release}
target=${CARGO_TARGET_DIR:-$PWD/target}
if [[ $profile == release ]]; then
    cargo build --release --bin volcrypt
else
    cargo build --bin volcrypt
fi
bin=$target/$profile/volcrypt
[[ -x $bin ]] || { echo "bench-image-convert: $bin not built" >&2; exit 1; }
command -v qemu-img > /dev/null || { echo "bench-image-convert: qemu-img missing (apt-get install qemu-utils)" >&2; exit 1; }

# In tmpfs when there is room (3 x SIZE plus slack): the disk's write speed and volcrypt's
# fsync at the end (qemu-img convert does not flush by default) would otherwise dominate.
# BENCH_DIR overrides.
dir=${BENCH_DIR:-}
if [[ -z $dir ]] && [[ -d /dev/shm ]] &&
    (( $(df -Pm /dev/shm | awk 'NR == 2 { print $4 }') > 3 * size + 256 )); then
    dir=/dev/shm
fi
tmp=$(mktemp -d ${dir:+-p "$dir"})
trap 'rm -rf "$tmp"' EXIT
head -c "$((size << 20))" /dev/urandom > "$tmp/plain.raw"
printf 'bench passphrase' > "$tmp/pass"
fast=(--pbkdf pbkdf2 --pbkdf-iterations 1000)
"$bin" image encrypt "$tmp/plain.raw" --format qcow2 --output "$tmp/src.qcow2" --key-file "$tmp/pass" "${fast[@]}" 2>/dev/null
"$bin" image convert "$tmp/src.qcow2" --output "$tmp/src.luks" --key-file "$tmp/pass" "${fast[@]}" 2>/dev/null
rm "$tmp/plain.raw"   # only the encrypted sources stay in the page cache

secret=(--object "secret,id=sec0,file=$tmp/pass")
qcow2_in="driver=qcow2,file.filename=$tmp/src.qcow2,encrypt.key-secret=sec0"
luks_in="driver=luks,file.filename=$tmp/src.luks,key-secret=sec0"

# qemu-img before 9.2.1 fails its PBKDF benchmark at random with "Unable to get accurate CPU
# usage"; such a round is run again (its time is not counted).
qemu_img_retry() {
    local i
    for i in 1 2 3; do
        if qemu-img "$@" 2> "$tmp/qemu.err"; then return 0; fi
        grep -q 'Unable to get accurate CPU usage' "$tmp/qemu.err" || break
        rm -f "$tmp/out"
    done
    cat "$tmp/qemu.err" >&2
    return 1
}

# Best wall time of a command over the rounds, in seconds; $tmp/out is removed before each.
best() {
    local b="" t0 t1 d
    for _ in $(seq "$rounds"); do
        rm -f "$tmp/out"
        t0=$(date +%s.%N)
        "$@" > /dev/null 2>&1 || { echo "bench-image-convert: failed: $*" >&2; "$@" >&2; exit 1; }
        t1=$(date +%s.%N)
        d=$(echo "$t1 - $t0" | bc -l)
        if [[ -z $b ]] || (( $(echo "$d < $b" | bc -l) )); then b=$d; fi
    done
    rm -f "$tmp/out"
    echo "$b"
}
cat "$tmp/src.qcow2" "$tmp/src.luks" > /dev/null   # warm the page cache

q2r_qemu=$(best qemu_img_retry convert "${secret[@]}" --image-opts "$qcow2_in" \
    -O luks -o key-secret=sec0,iter-time=10 "$tmp/out")
q2r_vc=$(best "$bin" image convert "$tmp/src.qcow2" --output "$tmp/out" --key-file "$tmp/pass" "${fast[@]}")
r2q_qemu=$(best qemu_img_retry convert "${secret[@]}" --image-opts "$luks_in" \
    -O qcow2 -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 "$tmp/out")
r2q_vc=$(best "$bin" image convert "$tmp/src.luks" --format qcow2 --output "$tmp/out" --key-file "$tmp/pass" "${fast[@]}")

rate() { echo "$size / $1" | bc -l; }
printf 'bench-image-convert: %d MiB of random data in %s, best of %d (%s build, %s cores)\n' \
    "$size" "$(df -P "$tmp" | awk 'NR == 2 { print $1 }')" "$rounds" "$profile" "$(nproc)"
printf '  qcow2-LUKS -> raw LUKS   qemu-img convert: %8.3f s (%7.1f MiB/s)  volcrypt: %8.3f s (%7.1f MiB/s)  ratio %.2fx (goal >= 3x)\n' \
    "$q2r_qemu" "$(rate "$q2r_qemu")" "$q2r_vc" "$(rate "$q2r_vc")" "$(echo "$q2r_qemu / $q2r_vc" | bc -l)"
printf '  raw LUKS -> qcow2-LUKS   qemu-img convert: %8.3f s (%7.1f MiB/s)  volcrypt: %8.3f s (%7.1f MiB/s)  ratio %.2fx (goal >= 3x)\n' \
    "$r2q_qemu" "$(rate "$r2q_qemu")" "$r2q_vc" "$(rate "$r2q_vc")" "$(echo "$r2q_qemu / $r2q_vc" | bc -l)"
