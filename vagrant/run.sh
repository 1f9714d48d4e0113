#!/usr/bin/env bash
# The Vagrant end-to-end stage: builds the .deb and the box (both cached), then, inside a
# network namespace this script creates (only `lo`), runs libvirtd, a Barbican test server,
# vagrant and the scenarios of vagrant/scenarios.sh against the package installed in the guest.
#
#   vagrant/run.sh [SCENARIO...]       # as root; default: every scenario not marked pending
#
# Ends with the line `N passed, N failed`; exit 0 only when nothing failed. Whatever happens,
# `vagrant destroy -f` runs, libvirtd, Barbican and every process left in the namespace are
# stopped, and the namespace is deleted.
#
# Environment: VOLCRYPT_VAGRANT_DIR (cache: box, vagrant home, storage pool; default
# /var/cache/volcrypt/vagrant), VOLCRYPT_DEB (use this .deb instead of building one),
# VOLCRYPT_VAGRANT_KEEP=1 (keep the run's temp dir with logs), VOLCRYPT_VAGRANT_DRIVER=kvm
# (workstations with a usable /dev/kvm).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
export VOLCRYPT_VAGRANT_DIR=${VOLCRYPT_VAGRANT_DIR:-/var/cache/volcrypt/vagrant}
cache=$VOLCRYPT_VAGRANT_DIR
work=${VOLCRYPT_WORK_DIR:-$repo/.work}
log() { echo "vagrant-e2e: $*" >&2; }
timing() { printf 'vagrant-e2e: time %-18s %4d s\n' "$1" "$2" >&2; }

[ "$(id -u)" -eq 0 ] || { log "run as root (network namespace, libvirtd)"; exit 1; }
"$repo/scripts/install-deps.sh"
mkdir -p "$cache" "$work"

t=$SECONDS
if [ -n "${VOLCRYPT_DEB:-}" ]; then
  deb=$(readlink -f "$VOLCRYPT_DEB")
else
  deb=$("$repo/packaging/build-deb.sh" | tail -n1)
fi
[ -s "$deb" ] || { log "no .deb at '$deb'"; exit 1; }
timing "deb" $((SECONDS - t))

# promtool from Debian's prometheus package, unpacked only: installing the package would start
# a Prometheus server on hosts with systemd.
if [ ! -x "$cache/promtool/usr/bin/promtool" ]; then
  (cd "$cache" && rm -f prometheus_*.deb && apt-get download -q -o APT::Sandbox::User=root prometheus >/dev/null \
    && rm -rf promtool && dpkg-deb -x prometheus_*.deb promtool && rm -f prometheus_*.deb)
fi
export PATH=$cache/promtool/usr/bin:$PATH
promtool --version >/dev/null

t=$SECONDS
box=$("$here/build-box.sh")
timing "box" $((SECONDS - t))

# Barbican runs inside the namespace, where pip cannot reach PyPI: its virtualenv is made (or
# reused from the native stage's server) out here first.
t=$SECONDS
bdir=$work/barbican-vagrant
mkdir -p "$bdir"
if ! ls "$bdir"/venv/.volcrypt-installed-* >/dev/null 2>&1; then
  if ls "$work"/barbican/venv/.volcrypt-installed-* >/dev/null 2>&1; then
    rm -rf "$bdir/venv"; ln -s "$work/barbican/venv" "$bdir/venv"
  else
    "$repo/scripts/barbican-test-server.sh" start "$bdir" >/dev/null
    "$repo/scripts/barbican-test-server.sh" stop "$bdir" >/dev/null
  fi
fi
timing "barbican-venv" $((SECONDS - t))

run=$(mktemp -d "${TMPDIR:-/tmp}/volcrypt-vagrant.XXXXXX")
ns=volcrypt-e2e-$$
cleanup() {
  local rc=$?
  # The stage cleans up after itself; this is the backstop for a stage killed hard.
  if ip netns list 2>/dev/null | grep -qw "$ns"; then
    local pids
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [ -n "$pids" ]; then
      log "stopping processes left in $ns: $(echo $pids)"
      kill $pids 2>/dev/null || true; sleep 2
      pids=$(ip netns pids "$ns" 2>/dev/null || true)
      [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    fi
    ip netns del "$ns" || true
  fi
  if [ "${VOLCRYPT_VAGRANT_KEEP:-}" = 1 ] || [ $rc -ne 0 ]; then
    log "logs kept in $run"
  else
    rm -rf "$run"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$ns"
ip -n "$ns" link set lo up
log "network namespace $ns (lo only); logs in $run"
rc=0
ip netns exec "$ns" unshare --mount --propagation private \
  env VOLCRYPT_E2E_RUN="$run" VOLCRYPT_E2E_DEB="$deb" VOLCRYPT_E2E_BOX="$box" \
      VOLCRYPT_E2E_BARBICAN_DIR="$bdir" \
  "$here/stage.sh" "$@" || rc=$?
exit $rc
