#!/usr/bin/env bash
# Headless-browser tests of the admin page (GET /admin, admin.test.mjs) and the API
# reference (GET /docs, docs.test.mjs) against the real service.
#
#   tests/browser/run.sh                 builds target/debug/formid-ledger, then tests it
#   LEDGER_BIN=/path/to/bin tests/browser/run.sh   tests that binary, builds nothing
#
# Needs Node.js >= 20 and Debian's chromium (installed here with apt-get when run as
# root and missing). Screenshots land in tests/browser/screenshots/.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

log() { printf 'tests/browser/run.sh: %s\n' "$*" >&2; }

CHROMIUM_BIN="${CHROMIUM_BIN:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM_BIN" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing chromium from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    log "no browser at $CHROMIUM_BIN: install chromium (apt-get install -y chromium) or set CHROMIUM_BIN"
    exit 1
  fi
fi
export CHROMIUM_BIN

(cd "$HERE" && { npm ci --no-audit --no-fund || npm install --no-audit --no-fund; })

if [ -z "${LEDGER_BIN:-}" ]; then
  log "building the service (cargo build)"
  (cd "$REPO" && cargo build --bin formid-ledger)
  export LEDGER_BIN="$REPO/target/debug/formid-ledger"
fi

cd "$HERE"
exec node --test admin.test.mjs docs.test.mjs
