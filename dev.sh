#!/usr/bin/env bash
# The README's two commands and two more; each does its own setup on a fresh machine.
#   ./dev.sh serve [batchserve serve flags]   serve the tiny model on 127.0.0.1:8000
#   ./dev.sh test  [pytest args]              lint, type-check and run the test suite
#   ./dev.sh bench [runner args]              the benchmark runner (python -m benchmarks)
#   ./dev.sh docs [gen|check|mkdocs serve args]  the user guide on 127.0.0.1:8001; `gen`
#                                             rewrites its generated references, `check`
#                                             checks them and builds the site strictly
set -euo pipefail
cd "$(dirname "$0")"
VENV=${BATCHSERVE_VENV:-.venv}
PY="$VENV/bin/python"

# Colour only a terminal: log files and CI output get plain text.
if [ -t 2 ]; then log() { printf '\033[1m[dev.sh]\033[0m %s\n' "$*" >&2; }
else log() { printf '[dev.sh] %s\n' "$*" >&2; }; fi

setup_python() {  # $1: extras ("", "dev" or "docs"); $2: "loud" shows pip's own progress
  local stamp="$VENV/.installed-${1:-base}-$(cat pyproject.toml | sha1sum | cut -c1-12)"
  [ -f "$stamp" ] && return 0
  local quiet=-q
  if [ "${2:-}" = loud ]; then
    quiet=""
    log "setting up $VENV: torch and batchserve (about 90 s on a fresh machine; pip's" \
        "progress follows). Later runs start at once."
  fi
  [ -x "$PY" ] || { log "creating $VENV"; python3 -m venv "$VENV"; }
  if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      log "installing torch (CUDA build)"; "$PY" -m pip install $quiet torch
    else
      # The CPU wheel: local on our dev/CI machines, and a range the package accepts.
      log "installing torch 2.13.0 (CPU)"; "$PY" -m pip install $quiet torch==2.13.0
    fi
  fi
  if [ "${1:-}" = dev ] && command -v npm >/dev/null 2>&1; then
    log "installing dclint (Compose file linter, npm)"
    npm install -q --no-audit --no-fund --prefix "$VENV/node" dclint@3.1.0 >/dev/null \
      || log "could not install dclint; the compose lint test will be skipped"
  fi
  log "installing batchserve${1:+[$1]}"
  "$PY" -m pip install $quiet -e ".${1:+[$1]}"
  touch "$stamp"
}

# Real services the tests start on loopback ports (Debian packages): Prometheus + promtool,
# Redis (jobs queue), nginx (scale-out), Chromium + chromedriver (the web page); and jq, which
# the docs' curl examples use (tests/test_docs_examples.py runs them).
setup_debian() {
  local missing=()
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing+=(nginx)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
  command -v jq >/dev/null 2>&1 || missing+=(jq)
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  if command -v apt-get >/dev/null 2>&1; then
    log "installing Debian packages for the service tests: ${missing[*]} (a minute or two)"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      "${missing[@]}" >/dev/null 2>&1 \
      || { $sudo apt-get update -q >/dev/null 2>&1 \
           && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
                --no-install-recommends "${missing[@]}" >/dev/null 2>&1; } \
      || log "could not install ${missing[*]}; tests needing them skip (and fail under CI=true)"
  fi
  # Debian starts these as system services on install; the tests run their own.
  for svc in redis-server nginx; do
    # `|| true`: without systemd (containers, CI) these fail, and `set -e` must not end the run.
    { command -v systemctl >/dev/null 2>&1 && $sudo systemctl disable --now "$svc"; } \
      >/dev/null 2>&1 || true
    $sudo service "$svc" stop >/dev/null 2>&1 || true
  done
}

case "${1:-}" in
  serve)
    shift
    setup_python "" loud
    log "starting batchserve (model load and warm-up take a few seconds; ready when the log" \
        "says 'ready in')"
    exec "$VENV/bin/batchserve" serve "$@"
    ;;
  test)
    shift
    setup_python dev
    setup_debian
    export PATH="$PWD/$VENV/node/node_modules/.bin:$PATH:/usr/sbin"
    log "ruff";  "$VENV/bin/ruff" check src tests benchmarks deploy docs/hooks.py docs/examples
    log "mypy";  "$VENV/bin/mypy"
    log "pytest"
    exec "$PY" -m pytest "$@"
    ;;
  bench)
    shift
    setup_python dev
    exec "$PY" -m benchmarks "$@"
    ;;
  docs)
    shift
    setup_python docs
    export NO_MKDOCS_2_WARNING=1  # mkdocs-material's banner about its successor, on every run
    case "${1:-}" in
      gen) exec "$PY" -m batchserve.docgen ;;
      check)
        "$PY" -m batchserve.docgen --check
        exec "$VENV/bin/mkdocs" build --strict --site-dir "$(mktemp -d)" ;;
      *) exec "$VENV/bin/mkdocs" serve "$@" ;;
    esac
    ;;
  *)
    echo "usage: $0 serve [flags] | test [pytest args] | bench [runner args]" \
         "| docs [gen | check | mkdocs serve args]" >&2
    exit 2
    ;;
esac
