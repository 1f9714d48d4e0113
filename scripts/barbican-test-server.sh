#!/usr/bin/env bash
# Run a real OpenStack Barbican (PyPI `barbican`) on 127.0.0.1 for volcrypt's key-manager tests.
#
#   scripts/barbican-test-server.sh start  [WORKDIR]   # idempotent; prints `export VOLCRYPT_TEST_BARBICAN_URL=...`
#   scripts/barbican-test-server.sh stop   [WORKDIR]
#   scripts/barbican-test-server.sh status [WORKDIR]   # exit 0 and print the URL when it answers
#   BARBICAN_TEST_PORTS="HTTP_PORT TLS_PORT" ... start: restart on those ports (default: free ones)
#
# Typical use:  eval "$(scripts/barbican-test-server.sh start)"; cargo test --test keys_barbican
#
# WORKDIR (default $VOLCRYPT_BARBICAN_DIR or /tmp/volcrypt-barbican) holds everything:
#   venv/            python3 -m venv + `pip install --only-binary=:all: barbican==23.0.0 gunicorn`
#                    (~40 s and ~200 MB the first time; reused afterwards)
#   home/.barbican/barbican.conf   oslo.config looks in $HOME/.barbican before /etc, so gunicorn
#                    runs with HOME=WORKDIR/home and never reads or writes /etc/barbican
#   barbican.sqlite  the database (created on first start, kept across restarts)
#   kek              the simple_crypto plugin's Fernet key-encryption key (generated once, 0600)
#   barbican.pid, barbican.log, url           the plain-HTTP instance
#   tls/ca.pem, tls/server.{pem,key}           a throw-away CA and a server certificate for
#                    127.0.0.1 (openssl CLI), used by a second gunicorn serving HTTPS from the
#   barbican-tls.pid, barbican-tls.log, tls-url  same config and database
# Printed (for eval): VOLCRYPT_TEST_BARBICAN_URL, VOLCRYPT_TEST_BARBICAN_TLS_URL,
# VOLCRYPT_TEST_BARBICAN_CA.
# Auth: no Keystone. The /v1 pipeline is scripts/barbican/barbican-api-paste.ini; clients send
# X-Identity-Status: Confirmed, X-Project-Id and X-Roles: member (volcrypt's `headers` auth mode).
set -euo pipefail

BARBICAN_VERSION=23.0.0
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cmd="${1:-start}"
work="${2:-${VOLCRYPT_BARBICAN_DIR:-/tmp/volcrypt-barbican}}"
python="${PYTHON:-python3}"

log() { echo "barbican-test-server: $*" >&2; }

running_pid() {
    local pid name="${1:-barbican}"
    [[ -f "$work/$name.pid" ]] || return 1
    pid="$(cat "$work/$name.pid")"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# 0 when Barbican's version document answers (300 Multiple Choices, or 200).
healthy() {
    "$work/venv/bin/python" - "$1" "$work/tls/ca.pem" <<'PY'
import os, ssl, sys, urllib.request, urllib.error
ctx = ssl.create_default_context(cafile=sys.argv[2]) if sys.argv[1].startswith("https:") else None
try:
    urllib.request.urlopen(sys.argv[1] + "/", timeout=2, context=ctx)
except urllib.error.HTTPError as e:
    sys.exit(0 if e.code == 300 else 1)
except Exception:
    sys.exit(1)
PY
}

install_venv() {
    local marker="$work/venv/.volcrypt-installed-$BARBICAN_VERSION"
    [[ -f "$marker" ]] && return 0
    log "installing barbican==$BARBICAN_VERSION and gunicorn into $work/venv (wheels only)"
    local t0=$SECONDS
    "$python" -m venv "$work/venv"
    "$work/venv/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: \
        "barbican==$BARBICAN_VERSION" gunicorn >&2
    touch "$marker"
    log "installed in $((SECONDS - t0)) s"
}

free_port() {
    "$work/venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

write_config() {
    local port="$1"
    mkdir -p "$work/home/.barbican"
    if [[ ! -s "$work/kek" ]]; then
        (umask 077; "$work/venv/bin/python" -c \
            'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())' >"$work/kek")
    fi
    (umask 077; cat >"$work/home/.barbican/barbican.conf" <<CONF
[DEFAULT]
host_href = http://127.0.0.1:$port
db_auto_create = True
debug = False
log_file = $work/barbican-app.log

[database]
connection = sqlite:///$work/barbican.sqlite

[secretstore]
enabled_secretstore_plugins = store_crypto

[crypto]
enabled_crypto_plugins = simple_crypto

[simple_crypto_plugin]
kek = $(cat "$work/kek")
CONF
)
    cp "$here/barbican/barbican-api-paste.ini" "$work/barbican-api-paste.ini"
}

make_tls() {
    local d="$work/tls"
    [[ -s "$d/server.pem" && -s "$d/ca.pem" ]] && return 0
    mkdir -p "$d"
    (
        umask 077
        cd "$d"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
            -keyout ca.key -out ca.pem -subj "/CN=volcrypt test CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -keyout server.key -out server.csr -subj "/CN=127.0.0.1" 2>/dev/null
        printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=CA:FALSE" \
            "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
            -extfile server.ext -out server.pem 2>/dev/null
        chmod 0644 ca.pem
    )
}

# launch NAME PORT URL [gunicorn args...]: start one gunicorn, wait until it answers.
launch() {
    local name="$1" port="$2" url="$3" t0=$SECONDS
    shift 3
    # setsid: the server outlives this script and gets its own process group.
    HOME="$work/home" setsid "$work/venv/bin/gunicorn" --paste "$work/barbican-api-paste.ini" \
        --bind "127.0.0.1:$port" --workers 1 --timeout 60 \
        --pid "$work/$name.pid" --log-file "$work/$name.log" "$@" \
        </dev/null >>"$work/$name.log" 2>&1 &
    local launcher=$!
    for _ in $(seq 1 300); do
        if healthy "$url"; then
            log "$name up at $url after $((SECONDS - t0)) s (logs: $work/$name.log)"
            return 0
        fi
        if ! kill -0 "$launcher" 2>/dev/null; then
            log "$name: gunicorn exited; last log lines:"; tail -n 30 "$work/$name.log" >&2; return 1
        fi
        sleep 0.2
    done
    log "$name: no answer from $url within 60 s; last log lines:"; tail -n 30 "$work/$name.log" >&2
    return 1
}

print_env() {
    echo "export VOLCRYPT_TEST_BARBICAN_URL=$(cat "$work/url")"
    echo "export VOLCRYPT_TEST_BARBICAN_TLS_URL=$(cat "$work/tls-url")"
    echo "export VOLCRYPT_TEST_BARBICAN_CA=$work/tls/ca.pem"
}

is_up() {
    running_pid barbican >/dev/null && running_pid barbican-tls >/dev/null \
        && [[ -s "$work/url" && -s "$work/tls-url" ]] \
        && healthy "$(cat "$work/url")" && healthy "$(cat "$work/tls-url")"
}

start() {
    mkdir -p "$work"
    work="$(cd "$work" && pwd)"
    if [[ -d "$work/venv" ]] && is_up; then
        log "already running"
        print_env
        return 0
    fi
    stop_server quiet
    install_venv
    make_tls
    local port tls_port
    if [[ -n "${BARBICAN_TEST_PORTS:-}" ]]; then
        # A restart in place (the Vagrant stage's guest keeps forwarding to the old ports).
        read -r port tls_port <<<"$BARBICAN_TEST_PORTS"
    else
        port="$(free_port)"
        tls_port="$(free_port)"
    fi
    write_config "$port"
    if ! launch barbican "$port" "http://127.0.0.1:$port" ||
       ! launch barbican-tls "$tls_port" "https://127.0.0.1:$tls_port" \
            --certfile "$work/tls/server.pem" --keyfile "$work/tls/server.key"; then
        stop_server quiet
        return 1
    fi
    echo "http://127.0.0.1:$port" >"$work/url"
    echo "https://127.0.0.1:$tls_port" >"$work/tls-url"
    print_env
}

stop_server() {
    local pid name
    for name in barbican barbican-tls; do
        if pid="$(running_pid "$name")"; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
            [[ "${1:-}" == quiet ]] || log "stopped $name (pid $pid)"
        fi
        rm -f "$work/$name.pid"
    done
    rm -f "$work/url" "$work/tls-url"
}

case "$cmd" in
    start) start ;;
    stop) stop_server ;;
    status)
        if [[ -d "$work/venv" ]] && is_up; then
            print_env
        else
            log "not running"; exit 1
        fi ;;
    *) echo "usage: $0 start|stop|status [WORKDIR]" >&2; exit 2 ;;
esac
