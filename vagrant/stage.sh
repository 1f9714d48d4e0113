#!/usr/bin/env bash
# Runs inside the namespace vagrant/run.sh made (network: lo only; mounts: private). Starts
# libvirtd with a throw-away configuration, a Barbican on the namespace's 127.0.0.1, brings the
# guest up with vagrant, installs the .deb and runs the scenarios. Stops all of it on exit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
run=$VOLCRYPT_E2E_RUN
cache=$VOLCRYPT_VAGRANT_DIR
log() { echo "vagrant-e2e: $*" >&2; }
timing() { printf 'vagrant-e2e: time %-18s %4d s\n' "$1" "$2" >&2; }

# --- libvirtd, private to this mount namespace -----------------------------------------------
# Its sockets, state and configuration are tmpfs here: nothing of the host's libvirt is read or
# changed, and no network (default or management) is ever defined.
for d in /etc/libvirt /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do
  mkdir -p "$d"; mount -t tmpfs -o mode=0755 tmpfs "$d"
done
# Debian's libvirt resolves its QEMU user and group at start even when qemu.conf says root.
getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
cat >/etc/libvirt/libvirtd.conf <<'CONF'
listen_tls = 0
listen_tcp = 0
auth_unix_rw = "none"
unix_sock_group = "root"
CONF
# No per-domain users, cgroups, namespaces or labels: the build machines have no systemd and
# no AppArmor; the domain's QEMU is a plain root process inside our namespace.
cat >/etc/libvirt/qemu.conf <<'CONF'
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
# QEMU spawns one relay process per guest connection to Barbican (guestfwd cmd:); libvirt's
# default seccomp sandbox (spawn=deny) kills QEMU when it does.
seccomp_sandbox = 0
CONF
: >/etc/libvirt/libvirt.conf

barbican_started=""
up=""
cleanup() {
  local rc=$?
  set +e
  if [ -n "$up" ]; then
    log "vagrant destroy -f"
    (cd "$here" && timeout 300 vagrant destroy -f >"$run/destroy.log" 2>&1) || log "vagrant destroy failed (see $run/destroy.log)"
  fi
  [ -z "$barbican_started" ] || "$repo/scripts/barbican-test-server.sh" stop "$VOLCRYPT_E2E_BARBICAN_DIR" >/dev/null 2>&1
  if [ -s "$run/libvirtd.pid" ]; then
    local pid; pid=$(cat "$run/libvirtd.pid")
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t=$SECONDS
libvirtd -f /etc/libvirt/libvirtd.conf -p "$run/libvirtd.pid" -d
for _ in $(seq 100); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
virsh -c qemu:///system version >/dev/null

# --- Barbican on the namespace's loopback, reached by the guest through a QEMU guestfwd -----
eval "$("$repo/scripts/barbican-test-server.sh" start "$VOLCRYPT_E2E_BARBICAN_DIR")"
barbican_started=1
barbican_port=${VOLCRYPT_TEST_BARBICAN_URL##*:}
barbican_port=${barbican_port%%/*}
timing "libvirtd+barbican" $((SECONDS - t))

# --- vagrant ---------------------------------------------------------------------------------
export VAGRANT_HOME=$cache/home VAGRANT_CHECKPOINT_DISABLE=1 VAGRANT_NO_COLOR=1
export VAGRANT_DOTFILE_PATH=$run/dot-vagrant VAGRANT_DEFAULT_PROVIDER=libvirt
boxhash=$(basename "$VOLCRYPT_E2E_BOX" .box); boxhash=${boxhash#box-}
export VOLCRYPT_VAGRANT_BOX=local/volcrypt-e2e-$boxhash
export VOLCRYPT_VAGRANT_POOL=$cache/pool VOLCRYPT_VAGRANT_BARBICAN_PORT=$barbican_port
export VOLCRYPT_VAGRANT_PREFIX=volcrypt-e2e-$$-
export VOLCRYPT_VAGRANT_SSH_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$VOLCRYPT_VAGRANT_POOL"
(
  flock 9
  if ! vagrant box list 2>/dev/null | grep -q "^$VOLCRYPT_VAGRANT_BOX "; then
    # Boxes and pool images of older box builds are superseded.
    vagrant box list 2>/dev/null | awk '/^local\/volcrypt-e2e-/ {print $1}' | while read -r old; do
      vagrant box remove --force "$old" >/dev/null 2>&1 || true
    done
    find "$VOLCRYPT_VAGRANT_POOL" -maxdepth 1 -name 'local-VAGRANTSLASH-volcrypt-e2e-*' ! -name "*-${boxhash}_*" -delete
    vagrant box add --name "$VOLCRYPT_VAGRANT_BOX" "$VOLCRYPT_E2E_BOX" >"$run/box-add.log" 2>&1
  fi
) 9>"$cache/.box.lock"

t=$SECONDS
log "vagrant up (TCG: about a minute; the serial console goes to $run/serial.log)"
up=1
if ! (cd "$here" && vagrant up --provider libvirt >"$run/up.log" 2>&1); then
  tail -n 30 "$run/up.log" >&2
  log "vagrant up failed"
  exit 1
fi
timing "vagrant-up" $((SECONDS - t))
(cd "$here" && vagrant ssh-config) >"$run/ssh-config"
export VOLCRYPT_E2E_SSH_CONFIG=$run/ssh-config
export VOLCRYPT_E2E_DOMAIN=$(virsh -c qemu:///system list --name | grep -m1 "^$VOLCRYPT_VAGRANT_PREFIX")

t=$SECONDS
"$here/scenarios.sh" "$@"
timing "scenarios" $((SECONDS - t))
