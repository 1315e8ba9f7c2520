#!/usr/bin/env bash
# A local OCI registry (Debian's docker-registry, i.e. the CNCF distribution server) for Ember's tests and for
# trying `ember push` / `ember pull` by hand.
#
#   scripts/registry.sh install              install docker-registry with apt if it is missing
#   scripts/registry.sh start PORT DIR       serve 127.0.0.1:PORT, storage and config in DIR; print the URL
#   scripts/registry.sh stop DIR             stop the registry started with DIR
#
# `start` writes DIR/config.yml (no auth) and runs in the background (pid in DIR/registry.pid, log in
# DIR/registry.log). Auth is switched on through the server's own environment overrides, e.g.
#   REGISTRY_AUTH=htpasswd REGISTRY_AUTH_HTPASSWD_REALM=ember REGISTRY_AUTH_HTPASSWD_PATH=/x/htpasswd
set -euo pipefail

BIN=/usr/bin/docker-registry

install_registry() {
  if [ -x "$BIN" ]; then
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    sudo="sudo -n"  # never prompt: a test run must fail fast, not hang on a password
  fi
  export DEBIAN_FRONTEND=noninteractive
  # The package's own service must not start (and cannot, without systemd); policy-rc.d refusals are fine.
  $sudo apt-get install -y --no-install-recommends docker-registry >&2 \
    || { $sudo apt-get update >&2 && $sudo apt-get install -y --no-install-recommends docker-registry >&2; }
  [ -x "$BIN" ]
}

wait_ready() {
  local url=$1 pid=$2
  for _ in $(seq 1 100); do
    if ! kill -0 "$pid" 2>/dev/null; then
      return 1
    fi
    # /v2/ answers 200 (open) or 401 (auth on): either means the server is up.
    if python3 - "$url/v2/" <<'EOF' 2>/dev/null; then
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=1)
except urllib.error.HTTPError as e:
    sys.exit(0 if e.code == 401 else 1)
EOF
      return 0
    fi
    sleep 0.1
  done
  return 1
}

start_registry() {
  local port=$1 dir=$2
  mkdir -p "$dir/storage"
  dir=$(cd "$dir" && pwd)
  cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
EOF
  "$BIN" serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
  local pid=$!
  echo "$pid" >"$dir/registry.pid"
  if ! wait_ready "http://127.0.0.1:$port" "$pid"; then
    kill "$pid" 2>/dev/null || true
    echo "docker-registry did not start; its log:" >&2
    cat "$dir/registry.log" >&2
    return 1
  fi
  echo "http://127.0.0.1:$port"
}

stop_registry() {
  local dir=$1
  if [ -f "$dir/registry.pid" ]; then
    local pid
    pid=$(cat "$dir/registry.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    rm -f "$dir/registry.pid"
  fi
}

case "${1:-}" in
  install) install_registry ;;
  start) [ $# -eq 3 ] || { echo "usage: $0 start PORT DIR" >&2; exit 2; }; install_registry; start_registry "$2" "$3" ;;
  stop) [ $# -eq 2 ] || { echo "usage: $0 stop DIR" >&2; exit 2; }; stop_registry "$2" ;;
  *) echo "usage: $0 install | start PORT DIR | stop DIR" >&2; exit 2 ;;
esac
