#!/usr/bin/env bash
# Runs the whole test suite, on SQLite and on PostgreSQL.
#
# PostgreSQL: LEDGER_TEST_POSTGRES_URL names a server where the tests may create and
# drop databases (default postgres://postgres@127.0.0.1:5432/postgres, trust auth).
# With the default and no server answering, this script starts the local cluster,
# or installs one from Debian's packages when run as root on a fresh machine.
# The PostgreSQL tests fail (they never skip) when no server can be reached.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'scripts/test.sh: %s\n' "$*" >&2; }

pg_ready() { pg_isready -q -h 127.0.0.1 -p 5432 >/dev/null 2>&1; }

start_local_postgres() {
  if ! command -v pg_isready >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing PostgreSQL from Debian's packages"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    # A fresh cluster asks for passwords on TCP; the tests use trust on loopback only.
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
      sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
    done
  fi
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    for version in $(ls /etc/postgresql 2>/dev/null); do
      log "starting PostgreSQL $version"
      pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
  fi
  for _ in $(seq 1 30); do pg_ready && return 0; sleep 1; done
  log "PostgreSQL is not answering on 127.0.0.1:5432; set LEDGER_TEST_POSTGRES_URL to a server"
  return 1
}

if [ -z "${LEDGER_TEST_POSTGRES_URL:-}" ] && ! pg_ready; then
  start_local_postgres
fi

exec cargo test --all-targets "$@"
