#!/usr/bin/env bash
# The end-to-end scenarios, driven from the host (inside the stage's namespace) against the
# running guest: commands go over the SSH connection `vagrant ssh-config` describes (the one
# `vagrant ssh` opens, without its few seconds of Ruby start-up per call), disks are hot-plugged
# with virsh, the reboot is `vagrant reload`.
#
#   scenarios.sh [NAME...]     # default: every scenario in order (they build on each other)
#
# Each scenario prints one line, PASS or FAIL with what it proves (a failure also prints the
# tail of its log); the last line is `N passed, N failed`. Scenarios listed in PENDING are not
# proven green end to end yet: they run only when named explicitly.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
run=${VOLCRYPT_E2E_RUN:?run from vagrant/stage.sh}
cfg=${VOLCRYPT_E2E_SSH_CONFIG:?}
domain=${VOLCRYPT_E2E_DOMAIN:?}
deb=${VOLCRYPT_E2E_DEB:?}
virsh() { command virsh -c qemu:///system "$@"; }

# Guest-side helpers, prepended to every guest script.
read -r -d '' GLIB <<'LIB'
set -euo pipefail
SOCK=/run/volcrypt/api.sock
fail() { echo "FAILED: $*" >&2; exit 1; }
# call METHOD PATH [JSON]: sets CODE and BODY.
call() {
  local out
  out=$(curl -sS --max-time 200 --unix-socket "$SOCK" -X "$1" -H 'Content-Type: application/json' \
        ${3:+--data-binary "$3"} -w '\n%{http_code}' "http://localhost$2")
  CODE=${out##*$'\n'}; BODY=${out%$'\n'*}
}
expect() {
  local c
  for c in "$@"; do [ "$CODE" = "$c" ] && return 0; done
  fail "expected HTTP $*, got $CODE: $BODY"
}
field() { jq -r "$1" <<<"$BODY"; }
wait_socket() { for _ in $(seq 120); do [ -S "$SOCK" ] && return 0; sleep 0.5; done; fail "no $SOCK"; }
mapping_exists() { dmsetup info "$1" >/dev/null 2>&1; }
# The JSON of a selector attach.
attach_req() { # VOLUME_ID SELECTOR_JSON KEY_ID PROVIDER [WAIT_SECS]
  jq -cn --arg v "$1" --argjson d "$2" --arg k "$3" --arg p "$4" --arg w "${5:-}" \
    '{volume_id:$v, device:$d, encryption:{provider:$p, control_location:"front-end",
      cipher:"aes-xts-plain64", key_size:512, encryption_key_id:$k}}
     + (if $w == "" then {} else {wait_for_device:{timeout_secs:($w|tonumber)}} end)'
}
LIB

# g SCRIPT: run SCRIPT as root in the guest; its output and exit status come back.
g() {
  ssh -F "$cfg" -o LogLevel=ERROR -o ConnectTimeout=30 -o ServerAliveInterval=15 default \
    "sudo bash -c $(printf '%q' "$GLIB"$'\n'"$1")" </dev/null
}
wait_ssh() {
  for _ in $(seq 120); do g true 2>/dev/null && return 0; sleep 2; done
  echo "guest unreachable over SSH" >&2; return 1
}

pass=0 failn=0
results=()
scenario() { # NAME DESCRIPTION
  local name=$1 desc=$2 t=$SECONDS rc=0
  printf 'vagrant-e2e: running %s ...\n' "$name" >&2
  "sc_$name" >"$run/scenario-$name.log" 2>&1 || rc=$?
  if [ $rc -eq 0 ]; then
    pass=$((pass + 1)); printf 'PASS  %-20s %4ds  %s\n' "$name" $((SECONDS - t)) "$desc"
  else
    failn=$((failn + 1)); printf 'FAIL  %-20s %4ds  %s\n' "$name" $((SECONDS - t)) "$desc"
    sed 's/^/      | /' "$run/scenario-$name.log" | tail -n 25
  fi
}

# ---------------------------------------------------------------------------------------------
# package: `apt install ./volcrypt_*.deb` in the offline guest; what it installs and that it
# enables and starts nothing.
sc_package() {
  scp -F "$cfg" -o LogLevel=ERROR "$deb" default:/tmp/ || return 1
  g "
    cd /tmp && DEBIAN_FRONTEND=noninteractive apt-get install -y -q ./$(basename "$deb") >/tmp/apt.log 2>&1 \
      || { cat /tmp/apt.log; fail 'apt install failed'; }
    dpkg-query -W -f='\${Status}\n' volcrypt | grep -q 'install ok installed'
    test -x /usr/bin/volcrypt && volcrypt --version
    test -f /usr/lib/systemd/system/volcrypt.service || test -f /lib/systemd/system/volcrypt.service
    test -f /usr/lib/udev/rules.d/90-volcrypt.rules
    [ \"\$(stat -c %a /etc/volcrypt/volcrypt.toml)\" = 600 ] || fail 'config not 0600'
    dpkg-query -W -f='\${Conffiles}\n' volcrypt | grep -q /etc/volcrypt/volcrypt.toml || fail 'config is no conffile'
    for d in /var/lib/volcrypt /var/lib/volcrypt/state /var/lib/volcrypt/keys; do
      [ \"\$(stat -c %a \$d)\" = 700 ] || fail \"\$d not 0700\"
    done
    [ \"\$(systemctl is-enabled volcrypt || true)\" = disabled ] || fail 'the package enabled the service'
    [ \"\$(systemctl is-active volcrypt || true)\" = inactive ] || fail 'the package started the service'
    echo 'installed; disabled and inactive; config 0600 conffile; directories 0700'
  "
}

# service: `systemctl enable --now volcrypt` with the shipped config; the hardening is in force
# (from systemctl show and from the running process itself); /v1/health answers.
sc_service() {
  g '
    systemctl enable --now volcrypt
    wait_socket
    call GET /v1/health; expect 200
    echo "health: $(field .status)"
    [ "$(field .status)" = ok ] || fail "health not ok: $BODY"
    show() { systemctl show -P "$1" volcrypt; }
    [ "$(show NoNewPrivileges)" = yes ] || fail NoNewPrivileges
    [ "$(show ProtectSystem)" = strict ] || fail ProtectSystem
    [ "$(show DevicePolicy)" = closed ] || fail DevicePolicy
    [ "$(show MemoryDenyWriteExecute)" = yes ] || fail MemoryDenyWriteExecute
    show CapabilityBoundingSet | grep -q cap_sys_admin || fail "no cap_sys_admin"
    ! show CapabilityBoundingSet | grep -q cap_sys_module || fail "cap_sys_module kept"
    pid=$(show MainPID)
    grep -q "^NoNewPrivs:[[:space:]]*1" /proc/$pid/status || fail "NoNewPrivs not set on the agent"
    grep -q "^Seccomp:[[:space:]]*2" /proc/$pid/status || fail "no seccomp filter on the agent"
    capbnd=$(awk "/^CapBnd/ {print \$2}" /proc/$pid/status)
    [ "$capbnd" != 000001ffffffffff ] && [ "$capbnd" != 000003ffffffffff ] || fail "full bounding set $capbnd"
    # ProtectSystem=strict as the agent sees it: /usr is read-only in its mount namespace.
    if nsenter -t "$pid" -m touch /usr/volcrypt-write-test 2>/dev/null; then fail "/usr writable for the agent"; fi
    echo "hardening in force: NoNewPrivs=1 Seccomp=2 CapBnd=$capbnd, /usr read-only for the agent"
  '
}

# wrong_uid: an unprivileged client is stopped by the socket directory (0750) and, with that
# fence opened on purpose, by the agent itself (SO_PEERCRED): 403 forbidden, counted.
sc_wrong_uid() {
  g '
    rc=0; runuser -u nobody -- curl -sS --max-time 10 --unix-socket $SOCK http://localhost/v1/health >/tmp/nobody.out 2>&1 || rc=$?
    [ $rc -ne 0 ] || fail "nobody reached the API through the socket permissions"
    echo "socket permissions: nobody refused (curl exit $rc)"
    # Open the filesystem fence; the agent must still refuse.
    chmod 0755 /run/volcrypt; chmod 0666 $SOCK
    code=$(runuser -u nobody -- curl -sS --max-time 10 -o /tmp/nobody.body -w "%{http_code}" --unix-socket $SOCK http://localhost/v1/health || true)
    chmod 0750 /run/volcrypt; chmod 0660 $SOCK
    [ "$code" = 403 ] || fail "agent answered $code to nobody: $(cat /tmp/nobody.body)"
    jq -e ".error.code == \"forbidden\"" /tmp/nobody.body >/dev/null || fail "not forbidden: $(cat /tmp/nobody.body)"
    call GET /metrics; expect 200
    grep -Eq "^volcrypt_rejected_peers_total [1-9]" <<<"$BODY" || fail "rejected peer not counted"
    echo "agent refused uid nobody with 403 forbidden; volcrypt_rejected_peers_total counted it"
  '
}

# test_config: the test settings on top of the shipped file (a cheap KDF: the guest CPU is
# emulated; a short busy-detach deadline). Proves the shipped file accepts additions.
sc_test_config() {
  g '
    cat >>/etc/volcrypt/volcrypt.toml <<EOF

# --- end-to-end test settings ---
[volume.pbkdf]
kind = "pbkdf2"
iterations = 1000
EOF
    sed -i "s/^#detach_timeout_ms = 10000 .*/detach_timeout_ms = 3000/" /etc/volcrypt/volcrypt.toml
    grep -q "^detach_timeout_ms = 3000" /etc/volcrypt/volcrypt.toml || fail "sed"
    systemctl restart volcrypt; wait_socket
    call GET /v1/health; expect 200
    echo "config with additions accepted"
  '
}

# busy_detach: a first attach formats a blank disk (by serial); detach while a process holds
# the mapping open is refused naming that process; once it is gone, detach succeeds.
sc_busy_detach() {
  g '
    head -c 32 /dev/urandom | base64 -w0 | volcrypt keystore add e2e-busy --type passphrase --file - >/dev/null
    call POST /v1/attachments "$(attach_req busy1 "{\"serial\":\"vc-data1\"}" e2e-busy luks2)"; expect 201
    [ "$(field .formatted)" = true ] || fail "blank disk not formatted: $BODY"
    dev=$(field .device); echo "attached busy1 at $dev (formatted on first attach)"
    # The holder must not keep the SSH session open, and goes away whatever happens.
    sleep 600 <"$dev" >/dev/null 2>&1 & holder=$!
    trap "kill $holder 2>/dev/null || true" EXIT
    sleep 1
    call DELETE /v1/attachments/busy1; expect 409
    grep -q "$holder (sleep)" <<<"$BODY" || fail "holder not named: $BODY"
    echo "busy detach refused: $(field .error.message)"
    kill $holder; wait $holder 2>/dev/null || true
    call DELETE /v1/attachments/busy1; expect 200
    mapping_exists crypt-busy1 && fail "mapping left"
    echo "detach after the holder went away: ok"
  '
}

# hotplug: attach requests waiting for a device by LUKS UUID and by serial; the host plugs the
# disks into the running guest (virsh attach-disk); unplug tears the mapping down and keeps the
# attachment waiting; plug back re-activates it.
hp_uuid=6a0d5b52-6b1f-4c5e-9a57-2f1e0c3d4b01
sc_hotplug() {
  local hp=$run/hotplug pass_b64
  mkdir -p "$hp"
  pass_b64=$(head -c 32 /dev/urandom | base64 -w0)
  # Two LUKS2 disks made on the host (format needs no device-mapper), one keystore passphrase.
  local n uuid_arg
  for n in a b; do
    uuid_arg=(); [ $n = a ] && uuid_arg=(--uuid "$hp_uuid")
    truncate -s 32M "$hp/$n.img"
    printf '%s' "$pass_b64" | base64 -d | cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 \
      --pbkdf-force-iterations 1000 --key-file - "${uuid_arg[@]}" "$hp/$n.img" || return 1
  done
  g "printf '%s' '$pass_b64' | base64 -d | volcrypt keystore add e2e-hot --type passphrase --file - >/dev/null" || return 1
  # Both attaches wait in the background in the guest.
  g '
    since=$(date +%s)
    ( call POST /v1/attachments "$(attach_req hot-uuid "{\"luks_uuid\":\"'$hp_uuid'\"}" e2e-hot luks2 300)"
      echo "$CODE $BODY" >/tmp/hot-uuid.out ) >/dev/null 2>&1 </dev/null &
    ( call POST /v1/attachments "$(attach_req hot-serial "{\"serial\":\"vc-hot-b\"}" e2e-hot luks2 300)"
      echo "$CODE $BODY" >/tmp/hot-serial.out ) >/dev/null 2>&1 </dev/null &
    # In-flight waits have no journal record yet: the agent logs each one.
    for _ in $(seq 90); do
      n=$(journalctl -u volcrypt --since "@$since" -o cat | grep -c "waiting for the device to appear" || true)
      [ "$n" -ge 2 ] && break; sleep 1
    done
    [ "$n" -ge 2 ] || fail "attaches not waiting ($n logged)"
    call GET /v1/attachments/hot-uuid; echo "while waiting: GET hot-uuid answers $CODE"
    echo "two attaches waiting in the agent (by LUKS UUID, by serial)"
  ' || return 1
  virsh attach-disk "$domain" "$hp/a.img" vdx --targetbus virtio --subdriver raw --serial vc-hot-a --live || return 1
  virsh attach-disk "$domain" "$hp/b.img" vdy --targetbus virtio --subdriver raw --serial vc-hot-b --live || return 1
  echo "host: plugged a.img (LUKS UUID $hp_uuid) and b.img (serial vc-hot-b)"
  g '
    for _ in $(seq 120); do [ -s /tmp/hot-uuid.out ] && [ -s /tmp/hot-serial.out ] && break; sleep 1; done
    for v in uuid serial; do
      read -r code body </tmp/hot-$v.out || fail "hot-$v: no answer"
      [ "$code" = 201 ] || fail "hot-$v: $code $body"
      mapping_exists crypt-hot-$v || fail "no mapping crypt-hot-$v"
      [ "$(jq -r .formatted <<<"$body")" = false ] || fail "hot-$v formatted"
      echo "hot-$v attached when its disk appeared: $(jq -r .device <<<"$body") on $(jq -r .backing_device <<<"$body")"
    done
    test -L /dev/disk/by-id/volcrypt-hot-uuid
  ' || return 1
  virsh detach-disk "$domain" vdx --live || return 1
  echo "host: unplugged a.img"
  g '
    for _ in $(seq 60); do mapping_exists crypt-hot-uuid || break; sleep 1; done
    mapping_exists crypt-hot-uuid && fail "mapping not torn down after unplug"
    call GET /v1/attachments/hot-uuid; expect 200
    echo "after unplug: mapping closed, phase $(field .phase)"
    [ "$(field .phase)" = waiting ] || fail "phase not waiting: $BODY"
    test ! -e /dev/disk/by-id/volcrypt-hot-uuid || fail "stable link left"
  ' || return 1
  virsh attach-disk "$domain" "$hp/a.img" vdx --targetbus virtio --subdriver raw --serial vc-hot-a --live || return 1
  echo "host: plugged a.img back"
  g '
    for _ in $(seq 60); do mapping_exists crypt-hot-uuid && break; sleep 1; done
    mapping_exists crypt-hot-uuid || fail "not re-activated after plug-back"
    call GET /v1/attachments/hot-uuid; expect 200
    [ "$(field .phase)" = attached ] || fail "phase: $BODY"
    echo "plugged back: re-activated, phase attached"
    call DELETE /v1/attachments/hot-uuid; expect 200
    call DELETE /v1/attachments/hot-serial; expect 200
  ' || return 1
  virsh detach-disk "$domain" vdx --live >/dev/null && virsh detach-disk "$domain" vdy --live >/dev/null
}

# barbican: the agent switched to the real Barbican (forwarded from the namespace's loopback);
# a passphrase secret and a symmetric secret open volumes formatted on first attach, with the
# passphrase derived as OpenStack does (checked with cryptsetup); a wrong key is refused with
# the header and device-mapper unchanged.
sc_barbican() {
  g '
    B=http://10.0.2.100:9311
    H=(-H "X-Identity-Status: Confirmed" -H "X-Project-Id: volcrypt-e2e" -H "X-Roles: member" -H "Content-Type: application/json")
    pp=$(head -c 24 /dev/urandom | base64 -w0)
    sym=$(head -c 32 /dev/urandom | base64 -w0)
    mk() { curl -sS --max-time 30 "${H[@]}" -d "$1" $B/v1/secrets | jq -r .secret_ref | sed "s#.*/##"; }
    pid=$(mk "$(jq -cn --arg p "$pp" "{name:\"e2e-pp\", secret_type:\"passphrase\", payload:\$p, payload_content_type:\"text/plain\"}")")
    sid=$(mk "$(jq -cn --arg p "$sym" "{name:\"e2e-sym\", secret_type:\"symmetric\", algorithm:\"aes\", bit_length:256, mode:\"xts\", payload:\$p, payload_content_type:\"application/octet-stream\", payload_content_encoding:\"base64\"}")")
    [ -n "$pid" ] && [ "$pid" != null ] && [ -n "$sid" ] && [ "$sid" != null ] || fail "Barbican secrets not created"
    echo "$pid" >/root/e2e-pp.id; echo "$sid" >/root/e2e-sym.id
    ( umask 077; printf "%s" "$pp" >/root/e2e-pp.pass; printf "%s" "$sym" >/root/e2e-sym.b64
      printf "%s" "$sym" | base64 -d | od -An -vtx1 | tr -d " \n" >/root/e2e-sym.pass )
    echo "Barbican secrets: passphrase $pid, symmetric $sid"
    # As an operator would: uncomment and set keys in the shipped file, add the auth table.
    sed -i -e "s|^#backend = \"keystore\".*|backend = \"barbican\"|" \
           -e "s|^#endpoint = .*|endpoint = \"$B\"|" /etc/volcrypt/volcrypt.toml
    printf "\n[key_manager.barbican.auth]\nmethod = \"headers\"\nproject_id = \"volcrypt-e2e\"\n" >>/etc/volcrypt/volcrypt.toml
    grep -q "^backend = \"barbican\"" /etc/volcrypt/volcrypt.toml && grep -q "^endpoint = " /etc/volcrypt/volcrypt.toml || fail "config edit"
    systemctl restart volcrypt; wait_socket
    call GET /v1/health; expect 200
    call POST /v1/attachments "$(attach_req bb-pp "{\"serial\":\"vc-data2\"}" "$pid" luks2)"; expect 201
    [ "$(field .formatted)" = true ] || fail "not formatted: $BODY"
    echo "bb-pp: formatted and attached with the passphrase secret, derivation $(field .derivation)"
    call POST /v1/attachments "$(attach_req bb-sym "{\"serial\":\"vc-data3\"}" "$sid" luks)"; expect 201
    echo "bb-sym: formatted (LUKS1) and attached with the symmetric secret, derivation $(field .derivation)"
    d2=$(readlink -f /dev/disk/by-id/virtio-vc-data2); d3=$(readlink -f /dev/disk/by-id/virtio-vc-data3)
    cryptsetup open --test-passphrase --key-file /root/e2e-pp.pass "$d2" || fail "raw passphrase does not open bb-pp"
    cryptsetup open --test-passphrase --key-file /root/e2e-sym.pass "$d3" || fail "hex of the symmetric key does not open bb-sym"
    echo "cryptsetup: bb-pp opens with the raw passphrase, bb-sym with the lowercase hex of the key"
    # Wrong key: the LUKS1 disk of bb-sym, under another volume id, with the passphrase secret.
    call DELETE /v1/attachments/bb-sym; expect 200
    before=$(head -c 1M "$d3" | sha256sum); maps=$(dmsetup ls | sort)
    call POST /v1/attachments "$(attach_req bb-wrong "{\"serial\":\"vc-data3\"}" "$pid" luks)"; expect 422
    [ "$(field .error.code)" = wrong_key ] || fail "not wrong_key: $BODY"
    [ "$(head -c 1M "$d3" | sha256sum)" = "$before" ] || fail "header changed by a wrong-key attach"
    [ "$(dmsetup ls | sort)" = "$maps" ] || fail "device-mapper changed by a wrong-key attach"
    call GET /v1/attachments/bb-wrong; [ "$CODE" = 404 ] || fail "record kept for a refused attach: $CODE $BODY"
    echo "wrong key refused (422 wrong_key): header, mappings and journal unchanged"
    call POST /v1/attachments "$(attach_req bb-sym "{\"serial\":\"vc-data3\"}" "$sid" luks)"; expect 201
  '
}

# filesystem: ext4 on an attached volume keeps its data across detach/attach; fsck clean.
sc_filesystem() {
  g '
    mkfs.ext4 -q -L e2e /dev/mapper/crypt-bb-pp
    mkdir -p /mnt/e2e && mount /dev/mapper/crypt-bb-pp /mnt/e2e
    head -c 4M /dev/urandom >/mnt/e2e/data && sha256sum /mnt/e2e/data | cut -d" " -f1 >/root/e2e-data.sha
    umount /mnt/e2e
    call DELETE /v1/attachments/bb-pp; expect 200
    mapping_exists crypt-bb-pp && fail "mapping left after detach"
    call POST /v1/attachments "$(attach_req bb-pp "{\"serial\":\"vc-data2\"}" "$(cat /root/e2e-pp.id)" luks2)"; expect 201
    [ "$(field .formatted)" = false ] || fail "re-attach formatted!"
    e2fsck -fn /dev/mapper/crypt-bb-pp >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "fsck not clean"; }
    mount /dev/mapper/crypt-bb-pp /mnt/e2e
    [ "$(sha256sum /mnt/e2e/data | cut -d" " -f1)" = "$(cat /root/e2e-data.sha)" ] || fail "data changed"
    echo data-survives >/mnt/e2e/marker
    umount /mnt/e2e
    echo "ext4 written, detached, attached again: fsck clean, 4 MiB of data intact"
  '
}

# reboot: with volumes attached (Barbican keys), `vagrant reload`; after boot the agent alone
# has re-activated every journaled volume, links and data intact, fsck clean.
sc_reboot() {
  g '
    call GET /v1/attachments; echo "$BODY" | jq -c "[.. | objects | select(has(\"volume_id\")) | .volume_id]"
    dmsetup ls | sort >/root/e2e-maps.before
    sync
  ' || return 1
  (cd "$here" && timeout 900 vagrant reload >"$run/reload.log" 2>&1) || { tail -n 20 "$run/reload.log"; return 1; }
  wait_ssh || return 1
  g '
    # Nothing but the boot itself has run: no request was sent to the agent yet.
    for _ in $(seq 120); do mapping_exists crypt-bb-pp && mapping_exists crypt-bb-sym && break; sleep 1; done
    mapping_exists crypt-bb-pp || fail "bb-pp not re-activated at boot"
    mapping_exists crypt-bb-sym || fail "bb-sym not re-activated at boot"
    echo "after boot, re-activated by the agent: $(dmsetup ls --target crypt | cut -f1 | tr "\n" " ")"
    test -L /dev/disk/by-id/volcrypt-bb-pp && test -L /dev/disk/by-id/volcrypt-bb-sym || fail "stable links missing"
    e2fsck -fn /dev/mapper/crypt-bb-pp >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "fsck not clean after reboot"; }
    mount /dev/mapper/crypt-bb-pp /mnt/e2e
    [ "$(sha256sum /mnt/e2e/data | cut -d" " -f1)" = "$(cat /root/e2e-data.sha)" ] || fail "data changed"
    grep -q data-survives /mnt/e2e/marker; umount /mnt/e2e
    echo "links present, fsck clean, data intact"
    systemctl is-enabled volcrypt >/dev/null
    # Ordering: the agent started after udev coldplug and network-online.
    a=$(systemctl show -P ActiveEnterTimestampMonotonic volcrypt)
    n=$(systemctl show -P ActiveEnterTimestampMonotonic network-online.target)
    u=$(systemctl show -P ActiveEnterTimestampMonotonic systemd-udev-trigger.service)
    [ "$a" -ge "$n" ] && [ "$a" -ge "$u" ] || fail "agent started before network-online ($a < $n) or udev trigger ($u)"
    call GET /v1/health; expect 200
    echo "reconcile at boot: $(jq -c .reconcile <<<"$BODY")"
  '
}

# metrics: the running service's /metrics negotiates its format. A plain request (curl sends
# `Accept: */*`) gets the Prometheus text format 0.0.4: every family has HELP and TYPE under
# its samples' name (a counter's `_total` included), no `# EOF`; a scraper asking for
# OpenMetrics gets it, ending with `# EOF`. The gauges match the attachments.
sc_metrics() {
  g 'call GET /metrics; expect 200; printf "%s\n" "$BODY"' >"$run/metrics.txt" || return 1
  local f=$run/metrics.txt fam ct
  ct=$(g 'curl -sS -o /dev/null -w "%{content_type}" --unix-socket "$SOCK" http://localhost/metrics') || return 1
  [ "$ct" = "text/plain; version=0.0.4; charset=utf-8" ] || { echo "default content type: $ct"; return 1; }
  grep -q '^# EOF' "$f" && { echo "# EOF in the Prometheus text format"; return 1; }
  for fam in volcrypt_operation_duration_seconds volcrypt_active_attachments volcrypt_rejected_peers_total \
             volcrypt_http_requests_total volcrypt_kdf_memory_budget_mib; do
    grep -q "^# HELP $fam " "$f" && grep -q "^# TYPE $fam " "$f" || { echo "family $fam: no HELP/TYPE"; return 1; }
  done
  grep -Eq '^volcrypt_active_attachments 2$' "$f" || { grep active_attachments "$f"; echo "active attachments not 2"; return 1; }
  grep -Eq '^volcrypt_operation_duration_seconds_count\{op="attach",result="ok"\} [1-9]' "$f" \
    || { grep operation_duration_seconds_count "$f"; echo "no successful attach counted"; return 1; }
  g 'curl -sS -D /tmp/om.head -H "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5" \
       --unix-socket "$SOCK" http://localhost/metrics' >"$run/metrics-openmetrics.txt" || return 1
  [ "$(grep -v '^$' "$run/metrics-openmetrics.txt" | tail -n1)" = "# EOF" ] || { echo "OpenMetrics: no # EOF terminator"; return 1; }
  grep -q '^# TYPE volcrypt_rejected_peers counter$' "$run/metrics-openmetrics.txt" \
    || { echo "OpenMetrics: counter family not named without _total"; return 1; }
  echo "text format 0.0.4 by default ($(grep -vc '^#' "$f") samples), OpenMetrics on request; active attachments 2"
}

# metrics_promtool: Prometheus' own linter accepts what a plain scrape of the service returns.
sc_metrics_promtool() {
  g 'call GET /metrics; expect 200; printf "%s\n" "$BODY"' >"$run/metrics.txt" || return 1
  promtool check metrics <"$run/metrics.txt" || return 1
  echo "promtool check metrics: clean ($(grep -c '^# TYPE' "$run/metrics.txt") families)"
}

# journal: `journalctl -u volcrypt` holds structured (JSON) records of the attaches, and no
# secret: neither Barbican payload, keystore passphrase nor the symmetric key's hex.
sc_journal() {
  g '
    journalctl -u volcrypt -o cat --no-pager >/tmp/vc.log
    n=$(grep -c "^{" /tmp/vc.log || true)
    [ "$n" -gt 10 ] || fail "few JSON records: $n"
    grep "^{" /tmp/vc.log | jq -e . >/dev/null || fail "a record is not JSON"
    grep "^{" /tmp/vc.log | jq -r ".fields.message // .message // empty" | grep -qi attach || fail "no attach records"
    for f in /root/e2e-pp.pass /root/e2e-sym.pass; do
      grep -qF "$(cat $f)" /tmp/vc.log && fail "a secret from $f is in the journal"
    done
    grep -qF "$(cat /root/e2e-sym.b64)" /tmp/vc.log && fail "symmetric payload in the journal"
    echo "$n JSON records, levels: $(grep "^{" /tmp/vc.log | jq -r .level | sort | uniq -c | tr -s " \n" " "), no secret found"
  '
}

# barbican_down_reboot: a reboot with the Barbican server stopped. The agent comes up, answers
# health, reports the two Barbican-keyed volumes under reconcile.retrying with their records
# kept (nothing formatted), and opens them by itself once the server is back (retry with
# backoff); the file system and its data are intact.
sc_barbican_down_reboot() {
  local bdir=${VOLCRYPT_E2E_BARBICAN_DIR:?} ports
  # The guest's forwards point at these ports: the server comes back on the same ones.
  ports="$(sed 's/.*://' "$bdir/url") $(sed 's/.*://' "$bdir/tls-url")" || return 1
  "$here/../scripts/barbican-test-server.sh" stop "$bdir" >/dev/null || return 1
  (cd "$here" && timeout 900 vagrant reload >"$run/reload2.log" 2>&1) || { tail -n 20 "$run/reload2.log"; return 1; }
  wait_ssh || return 1
  g '
    wait_socket
    for _ in $(seq 300); do
      call GET /v1/health
      [ "$(jq -r .reconcile.detail <<<"$BODY")" != "start-up check still running" ] && break; sleep 1
    done
    health=$BODY
    echo "reconcile with Barbican down: $(jq -c "{progress: .reconcile.progress, retrying: [.reconcile.retrying[].volume_id]}" <<<"$health")"
    for v in bb-pp bb-sym; do
      jq -e --arg v "$v" "[.reconcile.retrying[].volume_id] | index(\$v)" <<<"$health" >/dev/null \
        || fail "$v not reported as retrying: $(jq -c .reconcile <<<"$health")"
      mapping_exists "crypt-$v" && fail "$v opened without its key?"
      call GET "/v1/attachments/$v"; expect 200
    done
    [ "$(jq -r .reconcile.progress.failed <<<"$health")" -ge 2 ] || fail "progress does not count the failures"
    echo "records kept, nothing opened, progress $(jq -c .reconcile.progress <<<"$health")"
  ' || return 1
  eval "$(BARBICAN_TEST_PORTS="$ports" "$here/../scripts/barbican-test-server.sh" start "$bdir")" >/dev/null || return 1
  g '
    ok=""
    for _ in $(seq 180); do mapping_exists crypt-bb-pp && mapping_exists crypt-bb-sym && { ok=1; break; }; sleep 1; done
    [ -n "$ok" ] || fail "volumes not opened after Barbican came back (no retry)"
    for _ in $(seq 30); do
      call GET /v1/health; [ "$(jq -r ".reconcile.retrying | length" <<<"$BODY")" = 0 ] && break; sleep 1
    done
    [ "$(jq -r ".reconcile.retrying | length" <<<"$BODY")" = 0 ] || fail "still retrying: $(jq -c .reconcile <<<"$BODY")"
    e2fsck -fn /dev/mapper/crypt-bb-pp >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "fsck not clean"; }
    mount /dev/mapper/crypt-bb-pp /mnt/e2e
    [ "$(sha256sum /mnt/e2e/data | cut -d" " -f1)" = "$(cat /root/e2e-data.sha)" ] || fail "data changed (formatted?)"
    umount /mnt/e2e
    echo "opened by the retry once Barbican returned: $(jq -c .reconcile.progress <<<"$BODY"); fsck clean, data intact"
  '
}

all=(package service wrong_uid test_config busy_detach hotplug barbican filesystem metrics metrics_promtool journal reboot barbican_down_reboot)
PENDING=()
declare -A desc=(
  [package]="apt install ./volcrypt_*.deb offline: files, 0600 conffile, 0700 dirs, nothing enabled or started"
  [service]="systemctl enable --now: /v1/health ok, hardening in force (systemctl show, /proc: NoNewPrivs, seccomp, CapBnd, read-only /usr)"
  [wrong_uid]="uid nobody refused by the socket's directory and, fence opened, by the agent (403, counted)"
  [test_config]="the shipped config plus test settings (cheap KDF, short detach deadline) accepted"
  [busy_detach]="blank disk formatted on first attach; busy detach names the holding process; succeeds after"
  [hotplug]="attaches wait by LUKS UUID and serial, virsh hot-plug activates; unplug tears down; plug back re-activates"
  [barbican]="real Barbican: passphrase + symmetric secrets (derivations checked by cryptsetup); wrong key refused, nothing changed"
  [filesystem]="ext4 survives detach/attach, fsck clean, data intact"
  [reboot]="vagrant reload: journaled volumes re-activated at boot by the agent, ordered after udev and network; data intact"
  [metrics]="/metrics of the service: text format 0.0.4 by default (HELP/TYPE per family), OpenMetrics (# EOF) when asked, gauges match"
  [metrics_promtool]="promtool check metrics on a plain scrape of the service: clean"
  [journal]="journalctl -u volcrypt: structured JSON records, no secret"
  [barbican_down_reboot]="reboot with Barbican stopped: volumes reported retrying, records kept; opened by the agent's retry when it returns, data intact"
)
chosen=("$@")
[ ${#chosen[@]} -gt 0 ] || chosen=("${all[@]}")
wait_ssh || { echo "0 passed, 1 failed"; exit 1; }
for s in "${chosen[@]}"; do
  declare -F "sc_$s" >/dev/null || { echo "unknown scenario $s" >&2; failn=$((failn + 1)); continue; }
  scenario "$s" "${desc[$s]}"
done
[ $# -gt 0 ] || [ ${#PENDING[@]} -eq 0 ] || echo "pending (not run): ${PENDING[*]} — see vagrant/README.md"
echo "$pass passed, $failn failed"
[ "$failn" -eq 0 ]
