#!/usr/bin/env bash
# Benchmarks formid-ledger on SQLite and PostgreSQL (release build, the WeChat
# simulator as peer, simulator latency 0). See BENCHMARKS.md for what is measured.
#
#   scripts/bench.sh                  # both backends
#   scripts/bench.sh postgres         # or: sqlite
#   BENCH_ROWS=1000000 BENCH_DURATION=10 scripts/bench.sh    # a quicker run
#
# Per backend and phase ("empty": a new database; "scale": BENCH_ROWS live credentials
# over BENCH_USERS users bulk-loaded by SQL, not through HTTP), scenarios:
#   ingest-single  64 clients, POST /v1/credentials with one form_id (send key)
#   ingest-batch   64 clients, POST /v1/credentials with BENCH_BATCH form_ids of one user
#   send           64 clients POST /v1/messages for users holding simulator-minted
#                  form_ids; messages reaching `sent` counted by the simulator
#   quota          64 clients, GET /v1/admin/users/{openid}/quota (users of ingest-batch)
#   quota-bulk     (scale only) the same over the bulk-loaded users
#   drain          the senders alone: BENCH_DRAIN_MESSAGES messages posted with one
#                  send_at BENCH_DRAIN_DUE_S ahead (users and form_ids as in send), then
#                  sent per second from send_at to the last delivery (simulator's
#                  count), once per latency of BENCH_DRAIN_LATENCIES: drain-0ms, drain-50ms
#   push           (only when named in BENCH_SCENARIOS) 64 clients POST safe-mode
#                  (encrypted, signed) subscribe_msg_popup_event pushes, one accept
#                  each, to /v1/wechat/push/{app}; pushes answered 200 `success` per
#                  second, then the ledger is read: one push_receipts row and one
#                  pushed grant per acknowledged push
#   campaign       (only when named in BENCH_SCENARIOS) one POST /v1/campaigns to
#                  BENCH_CAMPAIGN_USERS (100000) users holding one simulator form_id
#                  each, no rate_per_s: the request's time, then recipients sent per
#                  second (simulator's count) until done, beside the send scenario's;
#                  meanwhile single messages to 400 other users, one at a time, each
#                  timed until sent (40 before the campaign, the rest while it runs)
#   webhooks       (only when named in BENCH_SCENARIOS) a receiver inside ledger-load
#                  is registered for message.finished; 64 clients post messages as
#                  in send (own users, own send-setup); webhook events delivered per
#                  second (first arrival of each event id), and every posted
#                  message's event must arrive
#   mixed          (only when named in BENCH_SCENARIOS) reports while the senders
#                  drain: BENCH_MIXED_MESSAGES messages posted with one send_at
#                  BENCH_MIXED_DUE_S ahead (users and form_ids as in send, simulator
#                  at 0 ms); from 1 s after send_at, BENCH_MIXED_CLIENTS clients post
#                  single form_ids for BENCH_MIXED_DURATION s: mixed-ingest (their
#                  rate and latency) and mixed-drain (the drain beside them)
#   plain-insert   the plain ceilings, what ratios are against: the database doing the
#   plain-claim    plainest durable write per row, one statement per transaction
#                  (autocommit): one credential INSERT … ON CONFLICT DO NOTHING, or one
#                  claim UPDATE. PostgreSQL: pgbench, BENCH_CLIENTS clients, -j 2
#                  (scripts/bench/pgbench_plain_insert.sql, pgbench_claim.sql); SQLite:
#                  in-process on the service's pool (WAL, synchronous=NORMAL),
#                  BENCH_SQLITE_CEILING_THREADS thread(s)
#   ceiling-*      "own SQL" ceilings (BENCH_OWN_CEILINGS=1), for reference only: the
#                  service's own ingest transaction without the service: pgbench
#                  (PostgreSQL) or ledger::record/claim in-process (SQLite; PostgreSQL
#                  too with BENCH_PG_INPROC=1). On PostgreSQL the own claim is the
#                  plain claim statement, so it is not run twice.
#   *-cN           the p99-against-clients curve: ingest-single and quota again with N
#                  clients for each N of BENCH_CLIENT_CURVE (BENCH_CLIENTS itself is the
#                  main run); the report tabulates p99 and Little's-law mean latency
# Results: $BENCH_DIR/results.jsonl (one JSON object per scenario) and
# $BENCH_DIR/report.md (tables, machine, commands) and $BENCH_DIR/bench.svg (the
# empty phase's ratios to the plain ceilings: docs/bench.svg in the README).
#
# Knobs (environment):
#   BENCH_ROWS (10000000)  BENCH_USERS (BENCH_ROWS/10)  BENCH_DURATION (15 s measured)
#   BENCH_WARMUP (2 s)  BENCH_CLIENTS (64)  BENCH_BATCH (20)  BENCH_SEND_USERS (1000, 200
#   form_ids each)  BENCH_PHASES ("empty scale")  BENCH_PG_URL (postgres://postgres@127.0.0.1:5432)
#   BENCH_PG_DB (ledger_bench)  BENCH_DIR (target/bench)  BENCH_PORT (18180; simulator +1)
#   BENCH_RUST_LOG (warn)  BENCH_PG_ANALYZE_EVERY (5 s; 0 = off: how often to apply
#   autovacuum's ANALYZE rule, for servers with autovacuum off)  BENCH_PG_SETTLE (1: a
#   CHECKPOINT before each PostgreSQL scenario and ceiling; 0: none)  BENCH_SQLITE_CEILING_THREADS (1)
#   BENCH_PG_INPROC (1: also the in-process own-SQL ceilings on PostgreSQL)  BENCH_BUILD (1)
#   BENCH_OWN_CEILINGS (1; 0: only the plain ceilings)  BENCH_CLIENT_CURVE ("8 16 32 64";
#   "": no curve)  BENCH_CURVE_DURATION (BENCH_DURATION)
#   BENCH_SCENARIOS ("ingest-single ingest-batch send drain quota ceilings": a subset reruns
#   only those; add "push" and/or "webhooks" for those two, e.g.
#   BENCH_SCENARIOS="push webhooks" BENCH_PHASES=empty scripts/bench.sh)  BENCH_REUSE_DB (0; 1: keep the database of the last run, no bulk load)
#   BENCH_APPEND (0; 1: append to results.jsonl instead of starting it anew)
#   BENCH_SEND_MESSAGES (20000: most messages the send scenario posts)
#   BENCH_SIM_LATENCY_MS (0: the simulator's answer to each send in the send scenario
#   comes this much later, as a real WeChat call takes tens of ms)
#   BENCH_WEBHOOK_USERS (250) x BENCH_WEBHOOK_PER_USER (40) simulator form_ids, and
#   BENCH_WEBHOOK_MESSAGES (10000: most messages the webhooks scenario posts)
#   BENCH_CAMPAIGN_USERS (100000: recipients of the campaign scenario)
#   BENCH_MIXED_MESSAGES (40000)  BENCH_MIXED_DUE_S (35)  BENCH_MIXED_CLIENTS (16)
#   BENCH_MIXED_DURATION (5 s): the mixed scenario
#   BENCH_DRAIN_MESSAGES (10000)  BENCH_DRAIN_DUE_S (25: posting must end before)
#   BENCH_DRAIN_LATENCIES ("0 50": simulator latencies in ms, one drain each)
#   BENCH_DRAIN_TIMEOUT (90 s: how long it then waits for the backlog to be sent, so
#   the next scenario does not run beside the senders)
#   BENCH_PG_DB_SET (e.g. "plan_cache_mode = force_custom_plan": ALTER DATABASE … SET
#   on the fresh database, for experiments)
#   Any LEDGER_* variable set by the caller reaches the service (e.g. LEDGER_DB_POOL_SIZE),
#   and libpq's PG* variables reach the service, psql and pgbench alike (e.g.
#   PGSSLMODE=disable: no TLS on the loopback connections; the default, prefer, uses it
#   when the server offers it).
set -euo pipefail

# The service's rate limits would measure themselves (64 clients on one key exceed
# the default 10,000/s per key): off unless the caller sets them.
export LEDGER_RATE_KEY_PER_S="${LEDGER_RATE_KEY_PER_S:-0}"
export LEDGER_RATE_SESSION_PER_MIN="${LEDGER_RATE_SESSION_PER_MIN:-0}"
export LEDGER_RATE_IP_PER_MIN="${LEDGER_RATE_IP_PER_MIN:-0}"
export LEDGER_RATE_LOGIN_IP_PER_MIN="${LEDGER_RATE_LOGIN_IP_PER_MIN:-0}"
export LEDGER_RATE_LOGIN_PER_S="${LEDGER_RATE_LOGIN_PER_S:-0}"
cd "$(dirname "$0")/.."
ROOT=$PWD

BENCH_ROWS=${BENCH_ROWS:-10000000}
BENCH_USERS=${BENCH_USERS:-$((BENCH_ROWS / 10))}
BENCH_DURATION=${BENCH_DURATION:-15}
BENCH_WARMUP=${BENCH_WARMUP:-2}
BENCH_CLIENTS=${BENCH_CLIENTS:-64}
BENCH_BATCH=${BENCH_BATCH:-20}
BENCH_SEND_USERS=${BENCH_SEND_USERS:-1000}
BENCH_SEND_PER_USER=${BENCH_SEND_PER_USER:-200}
BENCH_SEND_MESSAGES=${BENCH_SEND_MESSAGES:-20000}
BENCH_DRAIN_MESSAGES=${BENCH_DRAIN_MESSAGES:-10000}
BENCH_DRAIN_DUE_S=${BENCH_DRAIN_DUE_S:-25}
BENCH_DRAIN_LATENCIES=${BENCH_DRAIN_LATENCIES:-"0 50"}
BENCH_SIM_LATENCY_MS=${BENCH_SIM_LATENCY_MS:-0}
BENCH_DRAIN_TIMEOUT=${BENCH_DRAIN_TIMEOUT:-90}
BENCH_MIXED_MESSAGES=${BENCH_MIXED_MESSAGES:-40000}
BENCH_MIXED_DUE_S=${BENCH_MIXED_DUE_S:-35}
BENCH_MIXED_CLIENTS=${BENCH_MIXED_CLIENTS:-16}
BENCH_MIXED_DURATION=${BENCH_MIXED_DURATION:-5}
BENCH_WEBHOOK_USERS=${BENCH_WEBHOOK_USERS:-250}
BENCH_WEBHOOK_PER_USER=${BENCH_WEBHOOK_PER_USER:-40}
BENCH_WEBHOOK_MESSAGES=${BENCH_WEBHOOK_MESSAGES:-10000}
BENCH_CAMPAIGN_USERS=${BENCH_CAMPAIGN_USERS:-100000}
BENCH_CLAIM_USERS=${BENCH_CLAIM_USERS:-2000}
BENCH_CLAIM_PER_USER=${BENCH_CLAIM_PER_USER:-200}
BENCH_PHASES=${BENCH_PHASES:-"empty scale"}
BENCH_PG_URL=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}
BENCH_PG_DB=${BENCH_PG_DB:-ledger_bench}
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench}
BENCH_PORT=${BENCH_PORT:-18180}
SIM_PORT=$((BENCH_PORT + 1))
BENCH_RUST_LOG=${BENCH_RUST_LOG:-warn}
BENCH_PG_ANALYZE_EVERY=${BENCH_PG_ANALYZE_EVERY:-5}
BENCH_PG_SETTLE=${BENCH_PG_SETTLE:-1}
BENCH_SQLITE_CEILING_THREADS=${BENCH_SQLITE_CEILING_THREADS:-1}
BENCH_PG_INPROC=${BENCH_PG_INPROC:-1}
BENCH_BUILD=${BENCH_BUILD:-1}
BENCH_OWN_CEILINGS=${BENCH_OWN_CEILINGS:-1}
BENCH_CLIENT_CURVE=${BENCH_CLIENT_CURVE-"8 16 32 64"}
BENCH_CURVE_DURATION=${BENCH_CURVE_DURATION:-$BENCH_DURATION}
BENCH_SCENARIOS=${BENCH_SCENARIOS:-"ingest-single ingest-batch send drain quota ceilings"}
BENCH_REUSE_DB=${BENCH_REUSE_DB:-0}
BENCH_APPEND=${BENCH_APPEND:-0}
BACKENDS=${*:-"sqlite postgres"}

case "$BENCH_PG_DB" in ledger_bench*) ;; *) echo "BENCH_PG_DB must start with ledger_bench" >&2; exit 2 ;; esac

APP=wxbench
APP_SECRET=benchsecret-0123456789
KEY=benchkey-0123456789abcdef
# The bench app's message push (LEDGER_PUSH appid:token:EncodingAESKey): safe mode.
PUSH_TOKEN=benchPushToken2026
PUSH_AES_KEY=abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG
BASE=http://127.0.0.1:$BENCH_PORT
SIM=http://127.0.0.1:$SIM_PORT
BIN=$BENCH_DIR/bin
RESULTS=$BENCH_DIR/results.jsonl
LOGS=$BENCH_DIR/logs
SECS=$(awk "BEGIN{print $BENCH_WARMUP + $BENCH_DURATION}")

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

mkdir -p "$BENCH_DIR" "$LOGS" "$BIN"
[ "$BENCH_APPEND" = 1 ] || : > "$RESULTS"

if [ "$BENCH_BUILD" = 1 ]; then
  log "building (release)"
  # The service, and the load generator from the bench/ workspace member.
  cargo build --release -p formid-ledger --bin formid-ledger -p formid-ledger-bench --bin ledger-load >&2
fi
# Private copies: other builds of target/release during the run do not change them.
# Cargo builds into CARGO_TARGET_DIR when it is set (e.g. a target dir shared by worktrees).
RELEASE=${CARGO_TARGET_DIR:-target}/release
cp "$RELEASE/formid-ledger" "$RELEASE/ledger-load" "$BIN/"

SIM_PID= SVC_PID= ANALYZE_PID=
cleanup() {
  for p in $ANALYZE_PID $SVC_PID $SIM_PID; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

wait_http() { # url
  for _ in $(seq 1 200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
  log "no answer from $1"; return 1
}

start_sim() {
  "$BIN/formid-ledger" sim --bind "127.0.0.1:$SIM_PORT" --apps "$APP:$APP_SECRET" \
    > "$LOGS/sim-$1.log" 2>&1 &
  SIM_PID=$!
  wait_http "$SIM/sim/stats"
}

stop_pid() { # pid
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
}

start_service() { # database-url log-name
  env LEDGER_BIND="127.0.0.1:$BENCH_PORT" LEDGER_DATABASE_URL="$1" \
    LEDGER_APPS="$APP:$APP_SECRET" LEDGER_API_KEYS="bench:send+admin+token:$KEY" \
    LEDGER_PUSH="$APP:$PUSH_TOKEN:$PUSH_AES_KEY" LEDGER_WEBHOOK_ALLOW_PRIVATE=true \
    LEDGER_WECHAT_API_BASE="$SIM" LEDGER_SHUTDOWN_TIMEOUT_S="${LEDGER_SHUTDOWN_TIMEOUT_S:-2}" \
    RUST_LOG="$BENCH_RUST_LOG" "$BIN/formid-ledger" > "$LOGS/service-$2.log" 2>&1 &
  SVC_PID=$!
  wait_http "$BASE/readyz"
}

stop_service() { stop_pid "$SVC_PID"; SVC_PID=; }

record() { # one JSON line from a tool: keep it and show it
  local line
  line=$(cat)
  [ -n "$line" ] || return 0
  echo "$line" >> "$RESULTS"
  echo "$line" >&2
}

field() { # json key  (flat numeric fields only)
  grep -o "\"$2\":[0-9.]*" <<< "$1" | head -1 | cut -d: -f2
}

load() { "$BIN/ledger-load" "$@"; }

want() { [[ " $BENCH_SCENARIOS " == *" $1 "* ]]; }

common() { # backend phase scenario [clients duration]
  echo --url "$BASE" --key "$KEY" --clients "${4:-$BENCH_CLIENTS}" --duration "${5:-$BENCH_DURATION}" \
    --warmup "$BENCH_WARMUP" --backend "$1" --phase "$2" --scenario "$3" \
    --pid "$SVC_PID" --sim-pid "$SIM_PID"
}

pg_analyze_loop() { # db
  [ "$BENCH_PG_ANALYZE_EVERY" != 0 ] || return 0
  # autovacuum's rule: ANALYZE a table once more rows changed since its last ANALYZE
  # than autovacuum_analyze_threshold + autovacuum_analyze_scale_factor x its rows
  # (50 + 10 %). Read-only load never sets it off; a 10 M-row table seldom does.
  local due="SELECT string_agg(format('ANALYZE %I;', s.relname), ' ')
    FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
    WHERE s.relname IN ('credentials', 'messages')
      AND s.n_mod_since_analyze > current_setting('autovacuum_analyze_threshold')::float8
        + current_setting('autovacuum_analyze_scale_factor')::float8 * greatest(c.reltuples, 0)"
  ( while sleep "$BENCH_PG_ANALYZE_EVERY"; do
      sql=$(psql -qAt "$BENCH_PG_URL/$1" -c "$due" 2>/dev/null) || continue
      [ -z "$sql" ] || psql -q "$BENCH_PG_URL/$1" -c "$sql" >/dev/null 2>&1 || true
    done ) &
  ANALYZE_PID=$!
}

# Before each measured scenario on PostgreSQL: write back what the previous one left
# dirty (CHECKPOINT, as benchmarking guides advise), so that a checkpoint its WAL set
# off is not spread over the next scenario's seconds. SQLite's WAL is checkpointed by
# the service's own thread every 100 ms.
settle() { # backend database-url
  [ "$1" = postgres ] && [ "$BENCH_PG_SETTLE" = 1 ] || return 0
  psql -q "$2" -c CHECKPOINT >/dev/null
}

# Whether any scenario against the running service is wanted.
want_service() { want ingest-single || want ingest-batch || want send || want drain || want quota || want push || want webhooks || want campaign || want mixed; }

# The service scenarios of one phase, against the running service.
service_scenarios() { # backend phase database-url
  local b=$1 ph=$2 db=$3 out touched
  if want ingest-single; then
    log "$b/$ph: ingest-single"
    settle "$b" "$db"
    load ingest $(common "$b" "$ph" ingest-single) --batch 1 --prefix "o-$ph-single-" --users 100000 | record
  fi
  if want ingest-batch || want quota; then
    log "$b/$ph: ingest-batch ($BENCH_BATCH per request)"
    settle "$b" "$db"
    out=$(load ingest $(common "$b" "$ph" ingest-batch) --batch "$BENCH_BATCH" --prefix "o-$ph-batch-" --users 50000)
    echo "$out" | record
    touched=$(field "$out" users_touched)
  fi
  if want send; then
    log "$b/$ph: send setup ($BENCH_SEND_USERS users x $BENCH_SEND_PER_USER simulator form_ids)"
    load send-setup --url "$BASE" --key "$KEY" --sim "$SIM" --app "$APP" --prefix "o-$ph-send-" \
      --users "$BENCH_SEND_USERS" --per-user "$BENCH_SEND_PER_USER" >&2
    log "$b/$ph: send (simulator latency $BENCH_SIM_LATENCY_MS ms)"
    curl -sf -o /dev/null -XPOST "$SIM/sim/faults" -H 'content-type: application/json' \
      -d "{\"send\":{\"latency_ms\":$BENCH_SIM_LATENCY_MS}}"
    settle "$b" "$db"
    load send $(common "$b" "$ph" send) --sim "$SIM" --prefix "o-$ph-send-" \
      --users "$BENCH_SEND_USERS" --messages "$BENCH_SEND_MESSAGES" \
      --drain-timeout "$BENCH_DRAIN_TIMEOUT" | sed "s/^{/{\"sim_latency_ms\":$BENCH_SIM_LATENCY_MS,/" | record
    curl -sf -o /dev/null -XPOST "$SIM/sim/faults" -H 'content-type: application/json' -d '{}'
  fi
  if want drain; then
    # The senders alone: BENCH_DRAIN_MESSAGES messages posted with one send_at
    # BENCH_DRAIN_DUE_S ahead, then drained; once per simulator latency.
    for lat in $BENCH_DRAIN_LATENCIES; do
      log "$b/$ph: drain setup ($BENCH_SEND_USERS users, simulator at $lat ms)"
      load send-setup --url "$BASE" --key "$KEY" --sim "$SIM" --app "$APP" --prefix "o-$ph-drain$lat-" \
        --users "$BENCH_SEND_USERS" --per-user $(( BENCH_DRAIN_MESSAGES / BENCH_SEND_USERS + 1 )) >&2
      curl -sf -o /dev/null -XPOST "$SIM/sim/faults" -H 'content-type: application/json' \
        -d "{\"send\":{\"latency_ms\":$lat}}"
      log "$b/$ph: drain of $BENCH_DRAIN_MESSAGES messages due in $BENCH_DRAIN_DUE_S s (simulator at $lat ms)"
      settle "$b" "$db"
      load send $(common "$b" "$ph" "drain-${lat}ms") --sim "$SIM" --prefix "o-$ph-drain$lat-" \
        --users "$BENCH_SEND_USERS" --messages "$BENCH_DRAIN_MESSAGES" --due-in "$BENCH_DRAIN_DUE_S" \
        --drain-timeout "$BENCH_DRAIN_TIMEOUT" | sed "s/^{/{\"sim_latency_ms\":$lat,/" | record
      curl -sf -o /dev/null -XPOST "$SIM/sim/faults" -H 'content-type: application/json' -d '{}'
    done
  fi
  if want mixed; then
    log "$b/$ph: mixed setup ($BENCH_SEND_USERS users)"
    load send-setup --url "$BASE" --key "$KEY" --sim "$SIM" --app "$APP" --prefix "o-$ph-mixed-" \
      --users "$BENCH_SEND_USERS" --per-user $(( BENCH_MIXED_MESSAGES / BENCH_SEND_USERS + 1 )) >&2
    log "$b/$ph: mixed: $BENCH_MIXED_MESSAGES messages due in $BENCH_MIXED_DUE_S s, $BENCH_MIXED_CLIENTS clients reporting while they drain"
    settle "$b" "$db"
    # The reporters start 1 s after send_at (send's own clock starts just after).
    ( sleep $(( BENCH_MIXED_DUE_S + 1 ))
      load ingest --url "$BASE" --key "$KEY" --clients "$BENCH_MIXED_CLIENTS" --duration "$BENCH_MIXED_DURATION" \
        --warmup 0 --backend "$b" --phase "$ph" --scenario mixed-ingest --pid "$SVC_PID" \
        --batch 1 --prefix "o-$ph-mixed-in-" --users 10000 > "$LOGS/mixed-ingest-$b-$ph.json" ) &
    local reporters=$!
    load send $(common "$b" "$ph" mixed-drain) --sim "$SIM" --prefix "o-$ph-mixed-" \
      --users "$BENCH_SEND_USERS" --messages "$BENCH_MIXED_MESSAGES" --due-in "$BENCH_MIXED_DUE_S" \
      --drain-timeout "$BENCH_DRAIN_TIMEOUT" | sed 's/^{/{"sim_latency_ms":0,/' | record
    wait "$reporters"
    record < "$LOGS/mixed-ingest-$b-$ph.json"
  fi
  if want push; then
    log "$b/$ph: push (safe mode)"
    settle "$b" "$db"
    load push $(common "$b" "$ph" push) --app "$APP" --token "$PUSH_TOKEN" --aes-key "$PUSH_AES_KEY" \
      --db "$db" --prefix "p-$ph-" --users 100000 | record
  fi
  if want webhooks; then
    log "$b/$ph: webhooks setup ($BENCH_WEBHOOK_USERS users x $BENCH_WEBHOOK_PER_USER simulator form_ids)"
    load send-setup --url "$BASE" --key "$KEY" --sim "$SIM" --app "$APP" --prefix "o-$ph-wh-" \
      --users "$BENCH_WEBHOOK_USERS" --per-user "$BENCH_WEBHOOK_PER_USER" >&2
    log "$b/$ph: webhooks"
    settle "$b" "$db"
    load webhooks $(common "$b" "$ph" webhooks) --sim "$SIM" --prefix "o-$ph-wh-" --users "$BENCH_WEBHOOK_USERS" \
      --messages "$BENCH_WEBHOOK_MESSAGES" --drain-timeout "$BENCH_DRAIN_TIMEOUT" | record
  fi
  if want campaign; then
    log "$b/$ph: campaign setup ($BENCH_CAMPAIGN_USERS users x 1 simulator form_id)"
    load send-setup --url "$BASE" --key "$KEY" --sim "$SIM" --app "$APP" --prefix "o-$ph-cmp-" \
      --users "$BENCH_CAMPAIGN_USERS" --per-user 1 >&2
    load send-setup --url "$BASE" --key "$KEY" --sim "$SIM" --app "$APP" --prefix "o-$ph-probe-" \
      --users 400 --per-user 1 >&2
    log "$b/$ph: campaign"
    settle "$b" "$db"
    load campaign --url "$BASE" --key "$KEY" --sim "$SIM" --prefix "o-$ph-cmp-" \
      --probe-prefix "o-$ph-probe-" --probe-users 400 \
      --users "$BENCH_CAMPAIGN_USERS" --backend "$b" --phase "$ph" --pid "$SVC_PID" | record
  fi
  if want quota; then
    log "$b/$ph: quota ($touched users of ingest-batch)"
    settle "$b" "$db"
    load quota $(common "$b" "$ph" quota) --prefix "o-$ph-batch-" --users "${touched:-1}" | record
    if [ "$ph" != empty ]; then
      log "$b/$ph: quota-bulk ($BENCH_USERS bulk-loaded users)"
      settle "$b" "$db"
      load quota $(common "$b" "$ph" quota-bulk) --prefix ob --users "$BENCH_USERS" | record
    fi
  fi
  # p99 against clients: the same scenarios with fewer (or more) clients.
  local n
  for n in $BENCH_CLIENT_CURVE; do
    [ "$n" != "$BENCH_CLIENTS" ] || continue
    if want ingest-single; then
      log "$b/$ph: ingest-single with $n clients"
      settle "$b" "$db"
      load ingest $(common "$b" "$ph" "ingest-single-c$n" "$n" "$BENCH_CURVE_DURATION") --batch 1 \
        --prefix "o-$ph-single-" --users 100000 | record
    fi
    if want quota; then
      log "$b/$ph: quota with $n clients"
      settle "$b" "$db"
      load quota $(common "$b" "$ph" "quota-c$n" "$n" "$BENCH_CURVE_DURATION") --prefix "o-$ph-batch-" \
        --users "${touched:-1}" | record
    fi
  done
}

pgbench_ceiling() { # db phase scenario script prefix users
  local db=$1 ph=$2 sc=$3 script=$4 prefix=$5 users=$6 out tps lat p50 p99 n
  settle postgres "$BENCH_PG_URL/$db"
  rm -f "$BENCH_DIR"/pgbench_log.*
  # The server is shared: wait (up to 5 min) until it has room for our clients.
  local free
  for _ in $(seq 1 300); do
    free=$(psql -qAt "$BENCH_PG_URL/postgres" -c "SELECT current_setting('max_connections')::int - count(*) FROM pg_stat_activity")
    [ "$free" -gt $((BENCH_CLIENTS + 3)) ] && break
    sleep 1
  done
  out=$( cd "$BENCH_DIR" && pgbench -n -M prepared -c "$BENCH_CLIENTS" -j 2 -T "$SECS" \
    -D app="$APP" -D prefix="$prefix" -D users="$users" --log --log-prefix=pgbench_log \
    -f "$ROOT/scripts/bench/$script" "$BENCH_PG_URL/$db" 2>&1 ) || { echo "$out" >&2; return 1; }
  echo "$out" > "$LOGS/pgbench-$ph-$sc.txt"
  tps=$(grep -o 'tps = [0-9.]*' <<< "$out" | head -1 | cut -d' ' -f3)
  lat=$(grep -o 'latency average = [0-9.]*' <<< "$out" | cut -d' ' -f4)
  # Per-transaction log: field 3 is the latency in microseconds.
  read -r n p50 p99 < <(cat "$BENCH_DIR"/pgbench_log.* | awk '{print $3}' | sort -n |
    awk '{a[NR]=$1} END {i50=int(NR*0.5); i99=int(NR*0.99); if(i50<1)i50=1; if(i99<1)i99=1;
         printf "%d %.2f %.2f\n", NR, a[i50]/1000, a[i99]/1000}')
  rm -f "$BENCH_DIR"/pgbench_log.*
  printf '{"backend":"postgres","phase":"%s","scenario":"%s","tool":"pgbench -M prepared -c %s -j 2 -T %s","clients":%s,"requests":%s,"rps":%s,"items_per_s":%s,"p50_ms":%s,"p99_ms":%s,"latency_avg_ms":%s}\n' \
    "$ph" "$sc" "$BENCH_CLIENTS" "$SECS" "$BENCH_CLIENTS" "$n" "$tps" "$tps" "$p50" "$p99" "$lat" | record
}

run_postgres() {
  local db=$BENCH_PG_DB url=$BENCH_PG_URL/$BENCH_PG_DB ph
  if [ "$BENCH_REUSE_DB" != 1 ]; then
    log "postgres: fresh database $db"
    psql -q "$BENCH_PG_URL/postgres" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
    [ -z "${BENCH_PG_DB_SET:-}" ] || psql -q "$BENCH_PG_URL/postgres" -c "ALTER DATABASE $db SET $BENCH_PG_DB_SET" >/dev/null
    LEDGER_DATABASE_URL=$url "$BIN/formid-ledger" migrate >&2
    psql -q "$url" -c 'ANALYZE' >/dev/null
  fi
  start_sim postgres
  for ph in $BENCH_PHASES; do
    if [ "$ph" != empty ] && [ "$BENCH_REUSE_DB" != 1 ]; then
      log "postgres: bulk load $BENCH_ROWS credentials over $BENCH_USERS users"
      local t0=$SECONDS
      psql -q "$url" -v rows="$BENCH_ROWS" -v users="$BENCH_USERS" -v app="$APP" \
        -f scripts/bench/pg_bulk.sql > "$LOGS/pg-bulk.txt" 2>&1
      printf '{"backend":"postgres","phase":"%s","setup":"bulk_load","rows":%s,"users":%s,"secs":%s}\n' \
        "$ph" "$BENCH_ROWS" "$BENCH_USERS" $((SECONDS - t0)) | record
    fi
    if want_service; then
      start_service "$url" "postgres-$ph"
      pg_analyze_loop "$db"
      service_scenarios postgres "$ph" "$url"
      kill "$ANALYZE_PID" 2>/dev/null || true; ANALYZE_PID=
      stop_service
    fi
    want ceilings || continue
    psql -q "$url" -c "SELECT pg_size_pretty(pg_database_size('$db')) AS db_size, (SELECT count(*) FROM credentials) AS credentials" \
      >> "$LOGS/pg-sizes.txt"
    log "postgres/$ph: ceilings (service stopped)"
    psql -q "$url" -v users="$BENCH_CLAIM_USERS" -v per_user="$BENCH_CLAIM_PER_USER" -v app="$APP" \
      -v tag="$ph-$$" -f scripts/bench/pg_claim_fixture.sql >/dev/null
    pgbench_ceiling "$db" "$ph" plain-insert pgbench_plain_insert.sql "opgp-$ph-" 100000
    pgbench_ceiling "$db" "$ph" plain-claim pgbench_claim.sql oc "$BENCH_CLAIM_USERS"
    [ "$BENCH_OWN_CEILINGS" = 1 ] || continue
    pgbench_ceiling "$db" "$ph" ceiling-ingest pgbench_ingest.sql "opgb-$ph-" 100000
    if [ "$BENCH_PG_INPROC" = 1 ]; then
      settle postgres "$url"
      load ceiling --db "$url" --op ingest --threads "$BENCH_CLIENTS" --duration "$BENCH_DURATION" \
        --warmup "$BENCH_WARMUP" --app "$APP" --prefix "o-$ph-inproc-" --users 100000 \
        --backend postgres --phase "$ph" --scenario ceiling-ingest-inproc | record
      settle postgres "$url"
      load ceiling --db "$url" --op claim --threads "$BENCH_CLIENTS" --duration "$BENCH_DURATION" \
        --warmup "$BENCH_WARMUP" --app "$APP" --prefix oc --users "$BENCH_CLAIM_USERS" \
        --backend postgres --phase "$ph" --scenario ceiling-claim-inproc | record
    fi
  done
  stop_pid "$SIM_PID"; SIM_PID=
}

run_sqlite() {
  local dir=$BENCH_DIR/sqlite ph
  [ "$BENCH_REUSE_DB" = 1 ] || rm -rf "$dir"
  mkdir -p "$dir"
  local file=$dir/ledger.db url=sqlite://$dir/ledger.db
  LEDGER_DATABASE_URL=$url "$BIN/formid-ledger" migrate >&2
  start_sim sqlite
  for ph in $BENCH_PHASES; do
    if [ "$ph" != empty ] && [ "$BENCH_REUSE_DB" != 1 ]; then
      log "sqlite: bulk load $BENCH_ROWS credentials over $BENCH_USERS users"
      local t0=$SECONDS
      sed -e "s/@ROWS@/$BENCH_ROWS/g" -e "s/@USERS@/$BENCH_USERS/g" -e "s/@APP@/$APP/g" \
        scripts/bench/sqlite_bulk.sql | sqlite3 "$file" > "$LOGS/sqlite-bulk.txt" 2>&1
      printf '{"backend":"sqlite","phase":"%s","setup":"bulk_load","rows":%s,"users":%s,"secs":%s}\n' \
        "$ph" "$BENCH_ROWS" "$BENCH_USERS" $((SECONDS - t0)) | record
    fi
    if want_service; then
      start_service "$url" "sqlite-$ph"
      service_scenarios sqlite "$ph" "$url"
      stop_service
    fi
    want ceilings || continue
    ls -l "$dir" >> "$LOGS/sqlite-sizes.txt"
    log "sqlite/$ph: ceilings (service stopped; $BENCH_SQLITE_CEILING_THREADS thread(s), in-process)"
    sed -e "s/@USERS@/$BENCH_CLAIM_USERS/g" -e "s/@PER_USER@/$BENCH_CLAIM_PER_USER/g" \
      -e "s/@APP@/$APP/g" -e "s/@TAG@/$ph-$$/g" scripts/bench/sqlite_claim_fixture.sql | sqlite3 "$file" >/dev/null
    load ceiling --db "$url" --op plain-insert --threads "$BENCH_SQLITE_CEILING_THREADS" --duration "$BENCH_DURATION" \
      --warmup "$BENCH_WARMUP" --app "$APP" --prefix "o-$ph-plain-" --users 100000 \
      --backend sqlite --phase "$ph" --scenario plain-insert | record
    load ceiling --db "$url" --op plain-claim --threads "$BENCH_SQLITE_CEILING_THREADS" --duration "$BENCH_DURATION" \
      --warmup "$BENCH_WARMUP" --app "$APP" --prefix oc --users "$BENCH_CLAIM_USERS" \
      --backend sqlite --phase "$ph" --scenario plain-claim | record
    [ "$BENCH_OWN_CEILINGS" = 1 ] || continue
    load ceiling --db "$url" --op ingest --threads "$BENCH_SQLITE_CEILING_THREADS" --duration "$BENCH_DURATION" \
      --warmup "$BENCH_WARMUP" --app "$APP" --prefix "o-$ph-ceil-" --users 100000 \
      --backend sqlite --phase "$ph" --scenario ceiling-ingest | record
    load ceiling --db "$url" --op claim --threads "$BENCH_SQLITE_CEILING_THREADS" --duration "$BENCH_DURATION" \
      --warmup "$BENCH_WARMUP" --app "$APP" --prefix oc --users "$BENCH_CLAIM_USERS" \
      --backend sqlite --phase "$ph" --scenario ceiling-claim | record
  done
  stop_pid "$SIM_PID"; SIM_PID=
}

START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
for b in $BACKENDS; do
  case "$b" in
    sqlite) run_sqlite ;;
    postgres|pg) run_postgres ;;
    *) echo "unknown backend $b (sqlite, postgres)" >&2; exit 2 ;;
  esac
done

{
  echo "# formid-ledger benchmark run"
  echo
  echo "- started $START, finished $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- machine: nproc=$(nproc), CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), RAM: $(free -g | awk '/Mem:/{print $2}') GB"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?') ($(git status --porcelain 2>/dev/null | grep -c . || true) paths differ from it)"
  echo "- PostgreSQL: $(psql -qAt "$BENCH_PG_URL/postgres" -c 'SHOW server_version' 2>/dev/null || echo '?'); SQLite: $(sqlite3 --version | cut -d' ' -f1) (shell)"
  echo "- load: $(uptime | sed 's/.*load/load/') at the end (the machine may be shared)"
  echo "- BENCH_CLIENT_CURVE=\"$BENCH_CLIENT_CURVE\" BENCH_OWN_CEILINGS=$BENCH_OWN_CEILINGS BENCH_SCENARIOS=\"$BENCH_SCENARIOS\""
  echo "- BENCH_ROWS=$BENCH_ROWS BENCH_USERS=$BENCH_USERS BENCH_DURATION=$BENCH_DURATION BENCH_WARMUP=$BENCH_WARMUP BENCH_CLIENTS=$BENCH_CLIENTS BENCH_BATCH=$BENCH_BATCH BENCH_SEND_USERS=$BENCH_SEND_USERS BENCH_SEND_MESSAGES=$BENCH_SEND_MESSAGES BENCH_WEBHOOK_MESSAGES=$BENCH_WEBHOOK_MESSAGES BENCH_CAMPAIGN_USERS=$BENCH_CAMPAIGN_USERS BENCH_PG_ANALYZE_EVERY=$BENCH_PG_ANALYZE_EVERY BENCH_PG_SETTLE=$BENCH_PG_SETTLE RUST_LOG=$BENCH_RUST_LOG"
  echo "- service settings from the caller: $(env | grep '^LEDGER_' | tr '\n' ' ' || true)"
  grep '"setup":"bulk_load"' "$RESULTS" | sed 's/^/- bulk load: /' || true
  "$BIN/ledger-load" report "$RESULTS"
} > "$BENCH_DIR/report.md"
# The chart of the README (copy it to docs/bench.svg when the run is the one kept).
load chart "$RESULTS" --phase empty > "$BENCH_DIR/bench.svg"
log "done: $BENCH_DIR/report.md, $BENCH_DIR/bench.svg"
cat "$BENCH_DIR/report.md"
