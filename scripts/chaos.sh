#!/usr/bin/env bash
# Chaos run: formid-ledger under kill -9, a database restart and a faulty WeChat
# simulator, then checks of the ledger's invariants against the simulator's record.
# A webhook receiver (answering 503 to 15% of POSTs) hears message.finished: every
# message that ended final must have produced its event there at least once.
#
#   scripts/chaos.sh                      # PostgreSQL (3 instances) then SQLite (1 instance)
#   CHAOS_SECONDS=30 scripts/chaos.sh     # the CI job: shorter load phase
#
# Environment (all optional):
#   CHAOS_SECONDS    length of the load phase per backend (default 60)
#   CHAOS_BACKENDS   "postgres sqlite" (default), or one of them
#   CHAOS_SEED       seed of the driver's and the simulator's random choices (default: random)
#   CHAOS_PROFILE    release (default) or debug: which build of formid-ledger to use
#   CHAOS_BIN        use this formid-ledger binary instead of building one
#   CHAOS_SETTLE_S   bound on waiting for every message to reach a final state (default 120)
#   CHAOS_KEEP       1: keep the work directory (logs, databases) even when every check passed
#   CHAOS_PG_RESTART_MODE  fast or immediate (default: one of them, by the seed)
#   CHAOS_RUST_LOG   RUST_LOG of the instances (default info; logs in the work directory)
#   CHAOS_SELFTEST_TAMPER  1: falsify the record before checking (the checks must FAIL)
#   CHAOS_PUSH       1 (default): the simulator is WeChat's message pusher for the chaos app
#                    (popup and sent events to every instance, round-robin); 0: no pushes,
#                    so subscribe sends whose answer was lost stay outcome_unknown
#   PG_BIN           directory with initdb/pg_ctl/psql (default: the newest /usr/lib/postgresql/*/bin)
#
# PostgreSQL: the run starts its OWN throw-away cluster (initdb in a temp dir, its own
# port, trust auth, run as user postgres when started as root) and restarts THAT one
# mid-run; the machine's shared cluster on 5432 is never touched.
#
# Exit status: 0 when every invariant passed on every backend, 1 when one failed,
# 2 when the run could not be set up.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

log() { printf 'chaos.sh: %s\n' "$*" >&2; }

CHAOS_SECONDS=${CHAOS_SECONDS:-60}
CHAOS_BACKENDS=${CHAOS_BACKENDS:-"postgres sqlite"}
CHAOS_PROFILE=${CHAOS_PROFILE:-release}
CHAOS_SEED=${CHAOS_SEED:-$(( (RANDOM << 15) | RANDOM ))}
export CHAOS_SECONDS CHAOS_SEED

command -v python3 >/dev/null || { log "python3 (3.8+) is required"; exit 2; }

# --- the binary -------------------------------------------------------------------
if [ -n "${CHAOS_BIN:-}" ]; then
  BIN=$CHAOS_BIN
else
  case "$CHAOS_PROFILE" in
    release) log "cargo build --release (waits if another cargo holds the lock)"
             cargo build --release --bin formid-ledger >&2
             BIN=$ROOT/target/release/formid-ledger ;;
    debug)   log "cargo build"
             cargo build --bin formid-ledger >&2
             BIN=$ROOT/target/debug/formid-ledger ;;
    *) log "CHAOS_PROFILE must be release or debug"; exit 2 ;;
  esac
fi
[ -x "$BIN" ] || { log "no binary at $BIN"; exit 2; }

# --- PostgreSQL tools (only needed for the postgres backend) ---------------------
if [[ " $CHAOS_BACKENDS " == *" postgres "* ]]; then
  if [ -z "${PG_BIN:-}" ]; then
    initdb_path=$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$initdb_path" ] || initdb_path=$(command -v initdb || true)
    [ -n "$initdb_path" ] || { log "PostgreSQL server binaries (initdb) not found; set PG_BIN or CHAOS_BACKENDS=sqlite"; exit 2; }
    PG_BIN=$(dirname "$initdb_path")
  fi
  export PG_BIN
fi

# --- work directory and cleanup ---------------------------------------------------
WORK=$(mktemp -d /tmp/formid-chaos.XXXXXX)
chmod 755 "$WORK"    # the postgres user must reach its data directory inside
DRIVER_PID=""
KEEP=${CHAOS_KEEP:-0}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$DRIVER_PID" ] && kill -0 "$DRIVER_PID" 2>/dev/null; then
    kill -TERM "$DRIVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$DRIVER_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$DRIVER_PID" 2>/dev/null || true
  fi
  # Backstop: every process the driver started is listed in pids files (one id a line).
  for f in "$WORK"/*/pids; do
    [ -f "$f" ] || continue
    while read -r pid; do
      [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
    done <"$f"
  done
  # Backstop: our own PostgreSQL cluster, if it is still up.
  for d in "$WORK"/*/pgdata; do
    [ -f "$d/postmaster.pid" ] || continue
    if [ "$(id -u)" = 0 ]; then
      runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$d" stop -m immediate -w >/dev/null 2>&1 || true
    else
      "$PG_BIN/pg_ctl" -D "$d" stop -m immediate -w >/dev/null 2>&1 || true
    fi
  done
  if [ "$KEEP" = 1 ] || [ "$rc" != 0 ]; then
    log "work directory kept: $WORK (logs in $WORK/*/logs)"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the runs ---------------------------------------------------------------------
log "seed $CHAOS_SEED, ${CHAOS_SECONDS}s of load per backend, backends: $CHAOS_BACKENDS"
status=0
summary=""
for backend in $CHAOS_BACKENDS; do
  case "$backend" in postgres|sqlite) ;; *) log "unknown backend $backend"; exit 2 ;; esac
  mkdir -p "$WORK/$backend"
  set +e
  python3 "$ROOT/scripts/chaos/driver.py" --backend "$backend" --bin "$BIN" \
    --work "$WORK/$backend" --seconds "$CHAOS_SECONDS" --seed "$CHAOS_SEED" &
  DRIVER_PID=$!
  wait "$DRIVER_PID"
  rc=$?
  set -e
  DRIVER_PID=""
  case $rc in
    0) summary+="$backend: PASS"$'\n' ;;
    1) summary+="$backend: FAIL"$'\n'; status=1 ;;
    *) summary+="$backend: ERROR (exit $rc)"$'\n'; [ $status = 1 ] || status=2 ;;
  esac
done
printf '\n=== chaos summary (seed %s) ===\n%s' "$CHAOS_SEED" "$summary"
exit $status
