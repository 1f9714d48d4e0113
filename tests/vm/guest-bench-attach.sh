#!/bin/sh
# Guest side of the attach-overhead benchmark. Started by tests/vm/bench-attach.sh
# through tests/vm/run.sh; do not run it on a host.
#   guest-bench-attach.sh VOLCRYPT_BINARY [ROUNDS]
# One LUKS2 volume on a loop device, PBKDF2 with 1000 iterations so the KDF is negligible; then
# ROUNDS (default 50) alternating rounds of (a) `cryptsetup open --key-file=-` + `close` run as
# subprocesses (the os-brick path) and (b) POST /v1/attachments + DELETE against one running
# `volcrypt serve`, over one persistent HTTP/1.1 connection (Python http.client on AF_UNIX, so no
# client process is spawned per request). Only errors fail it, never the ratio: it is a
# benchmark, and under TCG the numbers are meaningful only relative to each other.
set -eu
[ "${VOLCRYPT_VM:-}" = 1 ] || { echo "guest-bench-attach: run me inside the VM (tests/vm/bench-attach.sh)" >&2; exit 2; }
[ $# -ge 1 ] || { echo "guest-bench-attach: usage: guest-bench-attach.sh VOLCRYPT_BINARY [ROUNDS]" >&2; exit 2; }
bin=$1
rounds=${2:-50}
[ -x "$bin" ] || { echo "guest-bench-attach: $bin is not an executable" >&2; exit 2; }

dir=$(mktemp -d /tmp/bench-attach.XXXXXX)
loop=
agent=
cleanup() {
    [ -n "$agent" ] && kill "$agent" 2>/dev/null && wait "$agent" 2>/dev/null
    cryptsetup close bench-sub 2>/dev/null || true
    [ -n "$loop" ] && { cryptsetup close "crypt-$(basename "$loop")" 2>/dev/null || true; losetup -d "$loop"; }
    rm -rf "$dir"
}
trap cleanup EXIT

# The passphrase volcrypt derives from a keystore `passphrase` secret is its payload verbatim.
printf 'bench passphrase 1000' > "$dir/pass"
"$bin" keystore --dir "$dir/keys" add bench-pass --type passphrase --file "$dir/pass"
truncate -s 32M "$dir/disk.img"
loop=$(losetup --find --show "$dir/disk.img")
cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --key-file "$dir/pass" "$loop"

cat > "$dir/volcrypt.toml" <<TOML
[server]
socket = "$dir/run/api.sock"
[volume]
state_dir = "$dir/state"
by_id_dir = "$dir/by-id"
[key_manager.keystore]
dir = "$dir/keys"
TOML
if [ -n "${VOLCRYPT_BENCH_LOG:-}" ]; then
    VOLCRYPT_LOG=$VOLCRYPT_BENCH_LOG "$bin" serve --config "$dir/volcrypt.toml" 2> "$dir/agent.log" &
else
    "$bin" --log-level warn serve --config "$dir/volcrypt.toml" 2> "$dir/agent.log" &
fi
agent=$!

echo "guest-bench-attach: kernel $(uname -r), $(nproc) vCPU, $rounds rounds per path, device $loop"
set +e
python3 - "$dir/run/api.sock" "$loop" "$dir/pass" "$rounds" "$agent" <<'PY'
import http.client, json, os, socket, statistics, subprocess, sys, time

sock_path, dev, pass_file, rounds, agent_pid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
with open(pass_file, "rb") as f:
    passphrase = f.read()

class UnixConn(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=120)
        self.path = path
    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(120)
        s.connect(self.path)
        self.sock = s

def fail(msg):
    print("guest-bench-attach: FAILED: " + msg, file=sys.stderr)
    sys.exit(1)

# Wait for the agent (TCG start-up is slow).
deadline = time.monotonic() + 120
while True:
    try:
        os.kill(agent_pid, 0)
    except OSError:
        fail("volcrypt serve exited during start-up")
    if os.path.exists(sock_path):
        try:
            c = UnixConn(sock_path)
            c.request("GET", "/v1/health")
            r = c.getresponse(); r.read()
            break
        except OSError:
            pass
    if time.monotonic() > deadline:
        fail("volcrypt serve did not answer on %s within 120 s" % sock_path)
    time.sleep(0.2)

conn = UnixConn(sock_path)
body = json.dumps({
    "volume_id": "bench-vol",
    "device_path": dev,
    "encryption": {"provider": "luks2", "control_location": "front-end",
                   "encryption_key_id": "bench-pass"},
    "options": {"replace_device_symlink": False},
}).encode()

def call(method, path, data=None):
    headers = {"Content-Type": "application/json"} if data is not None else {}
    t0 = time.perf_counter()
    conn.request(method, path, body=data, headers=headers)
    r = conn.getresponse()
    out = r.read()
    dt = time.perf_counter() - t0
    return r.status, out, dt

def rpc_round():
    s, out, ta = call("POST", "/v1/attachments", body)
    if s != 201:
        fail("POST /v1/attachments -> %d %s" % (s, out[:300]))
    v = json.loads(out)
    # Same volume, opened (not reformatted, not a leftover mapping), plaintext device present.
    if not v.get("encrypted") or v.get("formatted") or v.get("already_attached") or v.get("format") != "luks2":
        fail("unexpected attach outcome: %r" % v)
    if not os.path.exists(v.get("device", "")):
        fail("attach returned %r, which does not exist" % v.get("device"))
    if passphrase in out:
        fail("passphrase in the attach response")
    s, out, td = call("DELETE", "/v1/attachments/bench-vol")
    if s != 200 or not json.loads(out).get("was_active"):
        fail("DELETE /v1/attachments/bench-vol -> %d %s" % (s, out[:300]))
    return ta, td, v

def sub_round():
    t0 = time.perf_counter()
    p = subprocess.run(["cryptsetup", "open", "--type", "luks", "--key-file=-", dev, "bench-sub"],
                       input=passphrase, capture_output=True)
    ta = time.perf_counter() - t0
    if p.returncode != 0:
        fail("cryptsetup open -> %d %s" % (p.returncode, p.stderr.decode(errors="replace")))
    if not os.path.exists("/dev/mapper/bench-sub"):
        fail("cryptsetup open made no /dev/mapper/bench-sub")
    t0 = time.perf_counter()
    p = subprocess.run(["cryptsetup", "close", "bench-sub"], capture_output=True)
    td = time.perf_counter() - t0
    if p.returncode != 0:
        fail("cryptsetup close -> %d %s" % (p.returncode, p.stderr.decode(errors="replace")))
    return ta, td

# One warm-up round each (page cache, first-use costs), not counted.
_, _, first = rpc_round()
sub_round()

rpc_a, rpc_d, sub_a, sub_d = [], [], [], []
t_start = time.monotonic()
for i in range(rounds):
    # Alternate which path goes first so drift in host load hits both alike.
    order = (rpc_round, sub_round) if i % 2 == 0 else (sub_round, rpc_round)
    for f in order:
        res = f()
        if f is rpc_round:
            rpc_a.append(res[0]); rpc_d.append(res[1])
        else:
            sub_a.append(res[0]); sub_d.append(res[1])
elapsed = time.monotonic() - t_start

ms = lambda xs, f: f(xs) * 1000.0
def line(what, r, s, target):
    rm, sm = ms(r, statistics.median), ms(s, statistics.median)
    ra, sa = ms(r, statistics.mean), ms(s, statistics.mean)
    t = " (target <= %s)" % target if target else ""
    print("%s: volcrypt rpc median %.1f ms, cryptsetup subprocess median %.1f ms, ratio %.2fx%s"
          % (what, rm, sm, rm / sm, t))
    print("%s: volcrypt rpc mean %.1f ms (min %.1f, max %.1f), cryptsetup subprocess mean %.1f ms (min %.1f, max %.1f), ratio %.2fx"
          % (what, ra, ms(r, min), ms(r, max), sa, ms(s, min), ms(s, max), ra / sa))
print("mapping: volcrypt %s, subprocess bench-sub; %d rounds per path in %.0f s (TCG: ratios only)"
      % (first.get("mapping_name"), rounds, elapsed))
line("attach overhead", rpc_a, sub_a, "0.5x")
line("detach overhead", rpc_d, sub_d, None)

# Where the RPC time goes: the agent's own engine-call histogram (includes the warm-up round).
# Informational only; a missing metric is reported, not fatal.
s, out, _ = call("GET", "/metrics")
vals = {}
for l in out.decode(errors="replace").splitlines():
    for op in ("attach", "detach"):
        for kind in ("sum", "count"):
            key = 'volcrypt_operation_duration_seconds_%s{op="%s",result="ok"}' % (kind, op)
            if l.startswith(key + " "):
                vals[(op, kind)] = float(l.split()[-1])
for op, client in (("attach", rpc_a), ("detach", rpc_d)):
    if vals.get((op, "count")):
        eng = vals[(op, "sum")] / vals[(op, "count")] * 1000.0
        print("%s: agent engine time mean %.1f ms of the client-side mean %.1f ms (the rest: HTTP, JSON, locks, scheduling)"
              % (op, eng, statistics.mean(client) * 1000.0))
    else:
        print("%s: volcrypt_operation_duration_seconds not in /metrics (status %d)" % (op, s))

# The engine's own phase split (histogram sums / counts; warm-up round included).
import re
sums, counts = {}, {}
for l in out.decode(errors="replace").splitlines():
    m = re.match(r'(volcrypt_(?:attach_kdf|attach_dm|detach_dm|operation_phase)_seconds)_(sum|count)(\{[^}]*\})? (\S+)$', l)
    if m:
        key = m.group(1)[len("volcrypt_"):-len("_seconds")] + (m.group(3) or "")
        (sums if m.group(2) == "sum" else counts)[key] = float(m.group(4))
parts = ["%s %.1f ms" % (k, sums[k] / counts[k] * 1000.0) for k in sorted(sums) if counts.get(k)]
print("engine phases (mean per operation): " + (", ".join(parts) if parts else "none in /metrics"))
PY
rc=$?
set -e
if [ -n "${VOLCRYPT_BENCH_LOG:-}" ]; then
    # Mean of every *_ms field of the engine's phase lines (warm-up round included).
    python3 - "$dir/agent.log" <<'PY'
import re, sys, collections
sums = {"attach phases": collections.defaultdict(float), "detach phases": collections.defaultdict(float)}
counts = collections.Counter()
ansi = re.compile(r"\x1b\[[0-9;]*m")
for line in open(sys.argv[1], errors="replace"):
    line = ansi.sub("", line)
    for what in sums:
        if what in line:
            counts[what] += 1
            for k, v in re.findall(r"(\w+)_ms=([0-9.]+)", line):
                sums[what][k] += float(v)
for what, d in sums.items():
    n = counts[what]
    if n:
        print("%s (mean of %d): %s" % (what, n, ", ".join("%s %.1f ms" % (k, v / n) for k, v in d.items())))
PY
    echo "guest-bench-attach: agent log, last attach:"
    sed 's/\x1b\[[0-9;]*m//g' "$dir/agent.log" | grep 'method=POST' | tail -n "${VOLCRYPT_BENCH_LOG_TAIL:-60}"
fi
if [ $rc -ne 0 ]; then
    echo "guest-bench-attach: agent log tail:" >&2
    tail -20 "$dir/agent.log" >&2
fi
left=$(dmsetup ls --target crypt 2>/dev/null | grep -v '^No devices found' || true)
if [ -n "$left" ]; then
    echo "guest-bench-attach: mappings left behind: $left" >&2
    rc=1
fi
exit $rc
