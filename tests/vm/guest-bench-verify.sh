#!/bin/sh
# Guest side of the verify-cost benchmark. Started by tests/vm/bench-verify.sh through
# tests/vm/run.sh; do not run it on a host.
#   guest-bench-verify.sh VOLCRYPT_BINARY [ROUNDS] [DATA_MIB]
# One LUKS2 volume (PBKDF2 1000 iterations, so the unlock is negligible) on a loop device,
# attached by `volcrypt attach` and filled with random data through the mapping; then ROUNDS
# alternating rounds of (a) `dd iflag=direct bs=1M` reading the whole mapping to /dev/null and
# (b) `volcrypt verify --full` (which reads the mapping and the backing device and decrypts).
# Prints the median time of each and the median per-round ratio dd/verify (goal >= 0.8x). Only
# errors fail it.
set -eu
[ "${VOLCRYPT_VM:-}" = 1 ] || { echo "guest-bench-verify: run me inside the VM (tests/vm/bench-verify.sh)" >&2; exit 2; }
[ $# -ge 1 ] || { echo "guest-bench-verify: usage: guest-bench-verify.sh VOLCRYPT_BINARY [ROUNDS] [DATA_MIB]" >&2; exit 2; }
bin=$1
rounds=${2:-3}
mib=${3:-64}
[ -x "$bin" ] || { echo "guest-bench-verify: $bin is not an executable" >&2; exit 2; }

dir=$(mktemp -d /tmp/bench-verify.XXXXXX)
loop=
cleanup() {
    [ -n "$loop" ] && { "$bin" detach bench-v --config "$dir/volcrypt.toml" >/dev/null 2>&1 || true; losetup -d "$loop"; }
    rm -rf "$dir"
}
trap cleanup EXIT

printf 'bench passphrase 1000' > "$dir/pass"
"$bin" keystore --dir "$dir/keys" add bench-pass --type passphrase --file "$dir/pass"
truncate -s "$((mib + 16))M" "$dir/disk.img"
loop=$(losetup --find --show "$dir/disk.img")
cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --key-file "$dir/pass" "$loop"
cat > "$dir/volcrypt.toml" <<TOML
[volume]
state_dir = "$dir/state"
by_id_dir = "$dir/by-id"
[key_manager.keystore]
dir = "$dir/keys"
TOML
cat > "$dir/request.json" <<JSON
{"volume_id": "bench-v", "device_path": "$loop",
 "encryption": {"provider": "luks2", "control_location": "front-end", "encryption_key_id": "bench-pass"},
 "options": {"replace_device_symlink": false}}
JSON
mapper=$("$bin" attach --request "$dir/request.json" --config "$dir/volcrypt.toml" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["device"])')
size=$(blockdev --getsize64 "$mapper")
dd if=/dev/urandom of="$mapper" bs=1M oflag=direct status=none 2>/dev/null || true  # until full
echo "guest-bench-verify: kernel $(uname -r), $(nproc) vCPU, $rounds rounds, mapping $mapper $((size >> 20)) MiB"

now() { date +%s.%N; }
: > "$dir/times"
i=0
while [ "$i" -lt "$rounds" ]; do
    t0=$(now)
    dd if="$mapper" of=/dev/null bs=1M iflag=direct status=none
    t1=$(now)
    "$bin" verify bench-v --full --config "$dir/volcrypt.toml" > "$dir/report.json"
    t2=$(now)
    grep -q '"verdict": "agree"' "$dir/report.json" || { echo "guest-bench-verify: FAILED: verify did not agree: $(cat "$dir/report.json")" >&2; exit 1; }
    awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN { print b - a, c - b, (b - a) / (c - b) }' >> "$dir/times"
    i=$((i + 1))
done
# Medians of each column (the rounds alternate, so a noisy moment slows both sides of a round).
med() { cut -d' ' -f"$1" "$dir/times" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
awk -v dd="$(med 1)" -v ver="$(med 2)" -v ratio="$(med 3)" -v mib="$((size >> 20))" 'BEGIN {
    printf "guest-bench-verify: medians of alternating rounds, %d MiB\n", mib
    printf "  dd iflag=direct of the mapping: %8.3f s (%7.1f MiB/s)\n", dd, mib / dd
    printf "  volcrypt verify --full:         %8.3f s (%7.1f MiB/s)\n", ver, mib / ver
    printf "  ratio dd/verify: %.2fx (goal >= 0.8x)\n", ratio
}'
