#!/usr/bin/env bash
# Fuzz every endpoint of the service's own /openapi.json with schemathesis.
#
#   scripts/schemathesis.sh                       # builds (cargo build), then fuzzes
#   LEDGER_BIN=target/release/formid-ledger scripts/schemathesis.sh   # no build
#
# It starts the service in sandbox mode (no LEDGER_APPS: the built-in WeChat
# simulator serves the app `wxsandbox`) on a free port, with a fresh SQLite database
# in a temporary folder, one API key with every role and the rate limits off, waits
# for /healthz, then runs two schemathesis passes:
#
#   1. every operation, with `Authorization: Bearer <the API key>`. The client
#      endpoint POST /v1/client/credentials wants a client session, not a key, so in
#      this pass it only ever answers 401 (which is documented, and is what a key must
#      get there); schemathesis warns "Authentication failed" about it, harmlessly.
#   2. POST /v1/client/credentials alone, with a real client session obtained the way
#      a mini-program gets one: the simulator mints a wx.login() code
#      (POST /sim/codes), the service exchanges it (POST /v1/client/session).
#
# Checks (both passes): not_a_server_error (no 5xx), status_code_conformance,
# content_type_conformance, response_schema_conformance, response_headers_conformance
# and ignored_auth (a request without, or with a wrong, Authorization must not
# succeed). Each operation gets at most ST_MAX_EXAMPLES generated cases (default 50)
# per phase; pass 1 runs for ST_MAX_TIME seconds (default 300), pass 2 for
# ST_SESSION_MAX_TIME (default 120): schemathesis keeps generating until the budget is
# spent, so these are the run times.
#
# Exits non-zero if schemathesis reports any failure or error. Reports (JUnit, NDJSON,
# and a pytest file that reproduces each failure) and the service log are kept in
# the folder printed at the end when something failed (ST_KEEP=1: always).
#
# Other knobs: ST_SEED (default 1: runs are repeatable), ST_WORKERS (default 1, see
# below), SCHEMATHESIS_VENV (where schemathesis is installed; default under /tmp,
# reused across runs), ST_EXTRA_ARGS (appended to both `schemathesis run` calls).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCHEMATHESIS_VERSION=4.32.5 # works with Python 3.11; 4.x flags (-n, --max-time, -c)
VENV=${SCHEMATHESIS_VENV:-${TMPDIR:-/tmp}/formid-ledger-schemathesis-$SCHEMATHESIS_VERSION}
MAX_EXAMPLES=${ST_MAX_EXAMPLES:-50}
MAX_TIME=${ST_MAX_TIME:-300}
# Pass 2 covers one operation; schemathesis keeps fuzzing until --max-time is spent.
SESSION_MAX_TIME=${ST_SESSION_MAX_TIME:-120}
SEED=${ST_SEED:-1}
# One worker: with several, schemathesis' coverage phase builds hypothesis strategies
# from threads, and CPython 3.11.7's ast.parse is not thread-safe there
# ("SystemError: AST constructor recursion depth mismatch", a runtime error of the
# tool, not of the service). The machine has 2 cores and the service needs one.
WORKERS=${ST_WORKERS:-1}
API_KEY=fuzz-key-0123456789abcdef
CHECKS=not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance,ignored_auth

log() { printf '==> %s\n' "$*" >&2; }

# --- schemathesis, in a virtualenv of its own ----------------------------------------
if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
    log "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
ST="$VENV/bin/schemathesis"

# --- the service -----------------------------------------------------------------------
if [[ -z "${LEDGER_BIN:-}" ]]; then
    log "cargo build"
    (cd "$ROOT" && cargo build --quiet --bin formid-ledger)
    LEDGER_BIN="$ROOT/target/debug/formid-ledger"
fi
LEDGER_BIN=$(cd "$(dirname "$LEDGER_BIN")" && pwd)/$(basename "$LEDGER_BIN")
[[ -x "$LEDGER_BIN" ]] || { echo "no executable at $LEDGER_BIN" >&2; exit 2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ledger-schemathesis.XXXXXX")
SERVICE_PID=
STATUS=1
cleanup() {
    if [[ -n "$SERVICE_PID" ]] && kill -0 "$SERVICE_PID" 2>/dev/null; then
        kill "$SERVICE_PID" 2>/dev/null || true
        wait "$SERVICE_PID" 2>/dev/null || true
    fi
    if [[ $STATUS -eq 0 && -z "${ST_KEEP:-}" ]]; then
        rm -rf "$WORK"
    else
        echo "reports and the service log are in $WORK" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT"
log "starting $LEDGER_BIN on $BASE (sandbox, SQLite in $WORK)"
(
    cd "$WORK"
    # Only the settings below: none of the caller's LEDGER_* (LEDGER_BIN is this
    # script's own; other LEDGER_* of the caller could be settings or misspellings).
    # shellcheck disable=SC2046 # one "-u NAME" word per variable
    exec env $(env | sed -n 's/^\(LEDGER_[A-Z0-9_]*\)=.*/-u \1/p') \
        LEDGER_BIND="127.0.0.1:$PORT" \
        LEDGER_DATABASE_URL="sqlite://$WORK/ledger.db" \
        LEDGER_API_KEYS="fuzz:send+admin+token:$API_KEY" \
        LEDGER_RATE_KEY_PER_S=0 LEDGER_RATE_SESSION_PER_MIN=0 LEDGER_RATE_IP_PER_MIN=0 \
        LEDGER_RATE_AUTH_FAIL_PER_MIN=0 LEDGER_RATE_LOGIN_IP_PER_MIN=0 LEDGER_RATE_LOGIN_PER_S=0 \
        RUST_LOG="${RUST_LOG:-warn}" \
        "$LEDGER_BIN" serve
) >"$WORK/service.log" 2>&1 &
SERVICE_PID=$!

for _ in $(seq 1 300); do
    if curl -fsS "$BASE/healthz" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$SERVICE_PID" 2>/dev/null; then
        echo "the service exited at start:" >&2
        cat "$WORK/service.log" >&2
        exit 2
    fi
    sleep 0.2
done
curl -fsS "$BASE/healthz" >/dev/null || { echo "no /healthz after 60 s" >&2; exit 2; }

run_pass() { # NAME AUTH-HEADER MAX-TIME schemathesis-args...
    local name=$1 auth=$2 max_time=$3
    shift 3
    log "schemathesis pass: $name"
    local rc=0
    # From the temporary folder: schemathesis keeps a cache (.schemathesis/) in its
    # working directory, which does not belong in the repository.
    # shellcheck disable=SC2086 # ST_EXTRA_ARGS is a list of words on purpose
    (cd "$WORK" && "$ST" run "$BASE/openapi.json" \
        -H "Authorization: Bearer $auth" \
        --checks "$CHECKS" \
        --max-examples "$MAX_EXAMPLES" \
        --max-time "$max_time" \
        --seed "$SEED" \
        --workers "$WORKERS" \
        --request-timeout 30 \
        --no-color \
        --report junit,ndjson,pytest \
        --report-dir "$WORK/report-$name" \
        "$@" ${ST_EXTRA_ARGS:-}) || rc=$?
    if ! kill -0 "$SERVICE_PID" 2>/dev/null; then
        echo "the service died during pass $name; its log:" >&2
        tail -50 "$WORK/service.log" >&2
        rc=3
    fi
    return $rc
}

FAILED=0

# Pass 1: everything, with the API key.
run_pass api-key "$API_KEY" "$MAX_TIME" || FAILED=1

# Pass 2: the client endpoint with a real client session.
CODE=$(curl -fsS "$BASE/sim/codes" -H 'Content-Type: application/json' \
    -d '{"appid":"wxsandbox","openid":"o-fuzz"}' |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["code"])')
SESSION=$(curl -fsS "$BASE/v1/client/session" -H 'Content-Type: application/json' \
    -d "{\"code\":\"$CODE\"}" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["session"])')
[[ -n "$SESSION" ]] || { echo "could not obtain a client session" >&2; exit 2; }
run_pass client-session "$SESSION" "$SESSION_MAX_TIME" --include-path /v1/client/credentials || FAILED=1

if grep -qiE 'panicked|stack backtrace' "$WORK/service.log"; then
    echo "the service log shows a panic:" >&2
    grep -iE -A5 'panicked' "$WORK/service.log" >&2 || true
    FAILED=1
fi

if [[ $FAILED -eq 0 ]]; then
    STATUS=0
    log "schemathesis: no failures"
else
    log "schemathesis: FAILURES (see above)"
fi
exit $FAILED
