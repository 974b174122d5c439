#!/usr/bin/env python3
"""Chaos driver for formid-ledger (Python 3.8+, standard library only).

One run on one backend:
  1. starts the WeChat simulator (`formid-ledger sim`), the database (for PostgreSQL a
     throw-away cluster of our own on its own port) and the service instances
     (3 on PostgreSQL, 1 on SQLite), all on free loopback ports;
  2. for --seconds, at the same time:
     - mini-program clients log in (`/sim/codes` -> `POST /v1/client/session`) and
       report form_ids (`POST /v1/client/credentials` with the session);
     - backends register prepay_ids (`POST /v1/credentials`, single and batched);
     - users subscribe: the simulator mints one-time grants of the subscription
       template (and, with the pusher on, pushes their popup events to the service)
       and the mini-program reports the accepts (`subscriptions` in
       `POST /v1/client/credentials`, once: a lost answer stays lost);
     - backends send messages (`POST /v1/messages`), a share of them subscribe messages
       (the subscription template, to users who subscribed), some with `await_credential_s`
       (the payment case: the prepay_id is registered a moment later), some with an
       `Idempotency-Key` (retried on another instance until answered, sometimes
       repeated after an answer);
     - chaos: simulator send faults (-1, HTTP 500, dropped after read, latency), a
       token invalidated every few seconds, kill -9 of a random instance every few
       seconds (restarted at once), and one database restart (PostgreSQL);
  The simulator is WeChat's message pusher (`sim --push/--push-url`, round-robin over the
  instances; a killed instance costs pushes their retries, as it would with WeChat)
  unless CHAOS_PUSH=0: its sent events settle subscribe sends whose answer was lost.
  3. stops the load, clears the faults, makes sure every instance runs, waits (bounded)
     until every message is final, then checks the invariants from the simulator's
     record (`/sim/deliveries`, `/sim/stats`) and the database (psql / sqlite3) and
     prints them as a table.

Every message carries a unique tag in `data.keyword1.value`; the simulator records the
data it delivered, so each delivery is tied to exactly one message of the ledger.

Exit status: 0 all invariants PASS, 1 one FAILED, 2 the run could not be set up.
"""

import argparse
import collections
import http.server
import heapq
import http.client
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback

APP = "wxchaos0000000001"
APP_SECRET = "chaos-app-secret-0123456789"
KEY_SEND = "chaos-send-key-0123456789abcdef"
KEY_ADMIN = "chaos-admin-key-0123456789abcdef"
TEMPLATE = "TPL_CHAOS_SHIPPED"
SUB_TEMPLATE = "TPL_CHAOS_SUB"   # a subscription template (LEDGER_SUBSCRIPTION_TEMPLATES)
SUB_SHARE = 0.35         # share of messages sent with the subscription template
PUSH_TOKEN = "chaospushtoken0123"
PUSH_KEY = "Q2hhb3NQdXNoS2V5MDEyMzQ1Njc4OWFiY2RlZmdoaWo"   # 43 characters: EncodingAESKey
PREPAY_USES = 3          # uses per prepay_id, the same in the ledger and the simulator
USERS = 40               # mini-program users (openids)
WECHAT_TIMEOUT_S = 2     # LEDGER_WECHAT_TIMEOUT_S
LEASE_S = 3              # LEDGER_SENDER_LEASE_S
HTTP_TIMEOUT_S = 8       # the driver's bound on one HTTP request
FINAL = ("sent", "no_quota", "failed")


def now():
    return time.monotonic()


class SetupError(Exception):
    pass


def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_taken = set()


def free_port():
    """A free loopback port BELOW the ephemeral range: a killed instance is restarted on
    its port, which an outgoing connection must not grab in the meantime."""
    low = _ephemeral_low()
    lo, hi = (20000, low - 1) if low > 21000 else (1024 + 1, low - 1)
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(lo, hi)
        if port not in _taken and port_free(port):
            _taken.add(port)
            return port
    with socket.socket() as s:          # fall back to any port the kernel gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


# ----------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------

class HttpFailure(Exception):
    """No HTTP answer at all (refused, reset, timeout)."""


def request(port, method, path, body=None, headers=None, timeout=HTTP_TIMEOUT_S):
    """One request on a fresh connection: (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None
        hdrs = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=hdrs)
        res = conn.getresponse()
        raw = res.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode("utf-8", "replace")
        return res.status, parsed
    except (OSError, http.client.HTTPException) as e:
        raise HttpFailure(f"{method} :{port}{path}: {type(e).__name__}: {e}") from None
    finally:
        conn.close()


# ----------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------

class Procs:
    """Every process this driver starts; ids also go to <work>/pids for the shell trap."""

    def __init__(self, work):
        self.work = work
        self.logs = os.path.join(work, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.pidfile = os.path.join(work, "pids")
        self.lock = threading.Lock()
        self.running = {}

    def start(self, name, argv, env=None, log_name=None):
        log = open(os.path.join(self.logs, (log_name or name) + ".log"), "ab")
        log.write(f"\n=== {time.strftime('%H:%M:%S')} start {name}\n".encode())
        log.flush()
        p = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        with self.lock:
            self.running[name] = p
            with open(self.pidfile, "a") as f:
                f.write(f"{p.pid}\n")
        return p

    def kill9(self, name):
        with self.lock:
            p = self.running.pop(name, None)
        if p is None:
            return False
        try:
            p.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        return True

    def alive(self, name):
        with self.lock:
            p = self.running.get(name)
        return p is not None and p.poll() is None

    def kill_all(self):
        with self.lock:
            names = list(self.running)
        for n in names:
            self.kill9(n)


# ----------------------------------------------------------------------------------
# Databases
# ----------------------------------------------------------------------------------

class Postgres:
    """A throw-away PostgreSQL cluster of our own (never the shared one on 5432)."""

    def __init__(self, work, pg_bin):
        self.bin = pg_bin
        self.dir = os.path.join(work, "pgdata")
        self.sock = os.path.join(work, "pgsock")
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0
        self.log = os.path.join(work, "logs", "postgres.log")
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/ledger"
        self.restarts = 0

    def _run(self, args, timeout=120, check=True):
        argv = list(args)
        if self.as_postgres:
            argv = ["runuser", "-u", "postgres", "--"] + argv
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=timeout, cwd="/tmp")
        if check and r.returncode != 0:
            raise SetupError(f"{' '.join(args)}: exit {r.returncode}: "
                             f"{r.stdout.decode(errors='replace')[-2000:]}")
        return r

    def start(self):
        for d in (self.dir, self.sock):
            os.makedirs(d, exist_ok=True)
            if self.as_postgres:
                shutil.chown(d, "postgres", "postgres")
        os.chmod(self.dir, 0o700)
        open(self.log, "a").close()
        if self.as_postgres:
            shutil.chown(self.log, "postgres", "postgres")
        self._run([os.path.join(self.bin, "initdb"), "-D", self.dir, "-U", "postgres",
                   "-A", "trust", "-E", "UTF8", "--no-sync"])
        opts = (f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 "
                f"-c fsync=off -c full_page_writes=off -c max_connections=200 "
                f"-c shared_buffers=32MB")
        self._run([os.path.join(self.bin, "pg_ctl"), "-D", self.dir, "-l", self.log,
                   "-o", opts, "-w", "-t", "60", "start"])
        self.psql("CREATE DATABASE ledger", db="postgres")

    def restart(self, mode="fast"):
        self._run([os.path.join(self.bin, "pg_ctl"), "-D", self.dir, "-l", self.log,
                   "-m", mode, "-w", "-t", "60", "restart"])
        self.restarts += 1
        self.restart_mode = f"pg_ctl restart -m {mode}"

    def ensure_running(self):
        r = self._run([os.path.join(self.bin, "pg_ctl"), "-D", self.dir, "status"], check=False)
        if r.returncode != 0:
            self._run([os.path.join(self.bin, "pg_ctl"), "-D", self.dir, "-l", self.log,
                       "-w", "-t", "60", "start"])

    def stop(self):
        if os.path.exists(os.path.join(self.dir, "postmaster.pid")):
            self._run([os.path.join(self.bin, "pg_ctl"), "-D", self.dir, "-m", "immediate",
                       "-w", "stop"], check=False)

    def psql(self, sql, db="ledger"):
        psql = os.path.join(self.bin, "psql")
        if not os.path.exists(psql):
            psql = shutil.which("psql") or "psql"
        r = subprocess.run([psql, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                            "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                            "-d", db, "-c", sql],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        if r.returncode != 0:
            raise SetupError(f"psql: {r.stderr.decode(errors='replace')}")
        return r.stdout.decode()

    def rows(self, select):
        out = self.psql(f"SELECT coalesce(json_agg(t), '[]') FROM ({select}) t").strip()
        return json.loads(out or "[]")


class Sqlite:
    def __init__(self, work):
        self.path = os.path.join(work, "ledger.db")
        self.url = f"sqlite://{self.path}"
        self.restarts = 0

    def start(self):
        pass

    def ensure_running(self):
        pass

    def stop(self):
        pass

    def rows(self, select):
        # The sqlite3 CLI when present (as an operator would), else Python's module.
        cli = shutil.which("sqlite3")
        if cli:
            r = subprocess.run([cli, "-json", "-cmd", ".timeout 10000", self.path, select],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
            if r.returncode != 0:
                raise SetupError(f"sqlite3: {r.stderr.decode(errors='replace')}")
            out = r.stdout.decode().strip()
            return json.loads(out) if out else []
        con = sqlite3.connect(self.path, timeout=10)
        try:
            con.row_factory = sqlite3.Row
            return [dict(r) for r in con.execute(select)]
        finally:
            con.close()


# ----------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------

class WebhookReceiver:
    """The backend's webhook endpoint: keeps every event it is POSTed, and answers 503
    to a share of them (a flaky receiver: the ledger must retry until a 2xx)."""

    def __init__(self, seed, refuse=0.15):
        self.events = []               # (event id, type, data.id, data.status)
        self.refused = 0
        self.lock = threading.Lock()
        rng = random.Random(seed)
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    refuse_now = rng.random() < refuse
                    if refuse_now:
                        receiver.refused += 1
                    else:
                        try:
                            e = json.loads(body)
                            data = e.get("data") or {}
                            receiver.events.append((e.get("id"), e.get("type"),
                                                    data.get("id"), data.get("status")))
                        except ValueError:
                            receiver.events.append((None, "unparsable", None, None))
                self.send_response(503 if refuse_now else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, name="webhook-receiver",
                         daemon=True).start()

    def snapshot(self):
        with self.lock:
            return list(self.events), self.refused

    def stop(self):
        self.server.shutdown()


class Chaos:
    def __init__(self, args):
        self.args = args
        self.backend = args.backend
        self.rng = random.Random(args.seed)
        self.run_id = f"{args.seed:x}{self.backend[0]}"
        self.procs = Procs(args.work)
        self.db = (Postgres(args.work, os.environ.get("PG_BIN", ""))
                   if self.backend == "postgres" else Sqlite(args.work))
        self.n_instances = 3 if self.backend == "postgres" else 1
        self.sim_port = free_port()
        self.ports = [free_port() for _ in range(self.n_instances)]
        self.up = [False] * self.n_instances
        self.stop_load = threading.Event()
        self.stop_chaos = threading.Event()
        self.lock = threading.Lock()
        self.counters = collections.Counter()
        # Driver-side record (what clients were told).
        self.accepted_values = {}      # value -> (kind, openid): reports answered 200, not rejected
        self.message_ids = {}          # tag -> set of ids answered for that tag
        self.idem_tags = {}            # idempotency key -> tag
        self.events = []               # (t, text) chaos timeline
        self.sessions = {}             # openid -> session
        self.payments = []             # heap of (due, openid): prepay_ids to register
        self.grants_minted = collections.Counter()   # openid -> grants minted at the simulator
        self.push = os.environ.get("CHAOS_PUSH", "1") != "0"
        self.receiver = WebhookReceiver(args.seed)
        self.t0 = now()

    # -- helpers ---------------------------------------------------------------------

    def note(self, text):
        t = now() - self.t0
        with self.lock:
            self.events.append((t, text))
        print(f"[{self.backend} {t:6.1f}s] {text}", flush=True)

    def count(self, key, n=1):
        with self.lock:
            self.counters[key] += n

    def sim(self, method, path, body=None):
        status, data = request(self.sim_port, method, path, body, timeout=30)
        if status != 200:
            raise SetupError(f"simulator {method} {path}: {status} {data}")
        return data

    def service(self, method, path, body=None, key=None, headers=None, tries=8, rng=None):
        """Calls a running instance; on no answer (or 5xx/503) tries another one.
        Returns (status, body, port) or raises HttpFailure after `tries`."""
        rng = rng or random
        hdrs = dict(headers or {})
        if key:
            hdrs["Authorization"] = f"Bearer {key}"
        last = None
        for attempt in range(tries):
            live = [p for i, p in enumerate(self.ports) if self.up[i]] or self.ports
            port = rng.choice(live)
            try:
                status, data = request(port, method, path, body, hdrs)
            except HttpFailure as e:
                last = e
                self.count("http_no_answer")
                time.sleep(min(0.05 * (2 ** attempt), 1.0))
                continue
            if status >= 500:
                last = HttpFailure(f"{method} {path}: HTTP {status} {data}")
                self.count(f"http_{status}")
                time.sleep(min(0.05 * (2 ** attempt), 1.0))
                continue
            return status, data, port
        raise last or HttpFailure("no instance")

    # -- processes -------------------------------------------------------------------

    def instance_env(self, i):
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "RUST_LOG": os.environ.get("CHAOS_RUST_LOG", "info"),
            "LEDGER_BIND": f"127.0.0.1:{self.ports[i]}",
            "LEDGER_DATABASE_URL": self.db.url,
            "LEDGER_APPS": f"{APP}:{APP_SECRET}",
            "LEDGER_API_KEYS": f"backend:send:{KEY_SEND},ops:admin+send:{KEY_ADMIN}",
            "LEDGER_WECHAT_API_BASE": f"http://127.0.0.1:{self.sim_port}",
            "LEDGER_WECHAT_TIMEOUT_S": str(WECHAT_TIMEOUT_S),
            "LEDGER_SENDER_LEASE_S": str(LEASE_S),
            "LEDGER_SENDER_WORKERS": "4" if self.n_instances > 1 else "8",
            "LEDGER_HTTP_WORKERS": "2",
            "LEDGER_DB_POOL_SIZE": "8",
            "LEDGER_PREPAY_ID_USES": str(PREPAY_USES),
            "LEDGER_USER_CAP": "1000",
            "LEDGER_SEND_BACKOFF_BASE_MS": "200",
            # Every simulated mini-program logs in from 127.0.0.1: the per-address
            # login limit would refuse most of them (the chaos run is no flood).
            "LEDGER_RATE_LOGIN_IP_PER_MIN": "0",
            "LEDGER_SUBSCRIPTION_TEMPLATES": SUB_TEMPLATE,
            # The webhook receiver is on 127.0.0.1; its 503s are retried from 0.2 s.
            "LEDGER_WEBHOOK_ALLOW_PRIVATE": "true",
            "LEDGER_WEBHOOK_BACKOFF_BASE_MS": "200",
        }
        if self.push:
            env["LEDGER_PUSH"] = f"{APP}:{PUSH_TOKEN}:{PUSH_KEY}"
        return env

    def start_instance(self, i, wait=True):
        self.procs.start(f"ledger{i}", [self.args.bin], env=self.instance_env(i),
                         log_name=f"ledger{i}")
        if wait:
            self.wait_ready(i)

    def wait_ready(self, i, bound=30):
        deadline = now() + bound
        moves = 0
        while now() < deadline:
            if not self.procs.alive(f"ledger{i}"):
                log = os.path.join(self.procs.logs, f"ledger{i}.log")
                with open(log, "rb") as f:
                    f.seek(max(0, os.path.getsize(log) - 400))
                    tail = f.read().decode(errors="replace")
                if "cannot listen" in tail and moves < 3:
                    # Someone took the port while the instance was down: move it.
                    moves += 1
                    old, self.ports[i] = self.ports[i], free_port()
                    self.note(f"instance {i}: port {old} taken, moving to {self.ports[i]}")
                    self.start_instance(i, wait=False)
                    continue
                raise SetupError(f"instance {i} exited at start: {tail.strip()[-300:]}")
            try:
                status, _ = request(self.ports[i], "GET", "/readyz", timeout=2)
                if status == 200:
                    self.up[i] = True
                    return
            except HttpFailure:
                pass
            time.sleep(0.05)
        raise SetupError(f"instance {i} not ready after {bound}s")

    def setup(self):
        self.note(f"simulator on :{self.sim_port}, instances on {self.ports}, db {self.backend}, "
                  f"pusher {'on' if self.push else 'off (CHAOS_PUSH=0)'}")
        argv = [self.args.bin, "sim", "--bind", f"127.0.0.1:{self.sim_port}",
                "--apps", f"{APP}:{APP_SECRET}"]
        if self.push:
            # WeChat's push URL behind a load balancer: every instance, round-robin.
            argv += ["--push", f"{APP}:{PUSH_TOKEN}:{PUSH_KEY}", "--push-url",
                     ",".join(f"http://127.0.0.1:{p}" for p in self.ports)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
        self.procs.start("sim", argv, env={**env, "RUST_LOG": "warn"})
        deadline = now() + 20
        while True:
            try:
                if request(self.sim_port, "GET", "/sim/stats", timeout=2)[0] == 200:
                    break
            except HttpFailure:
                pass
            if now() > deadline:
                raise SetupError("simulator did not come up")
            time.sleep(0.05)
        self.db.start()
        if self.backend == "postgres":
            self.note(f"own PostgreSQL cluster on :{self.db.port} ({self.db.dir})")
        # The first instance migrates alone; the others start together.
        self.start_instance(0)
        for i in range(1, self.n_instances):
            self.start_instance(i, wait=False)
        for i in range(1, self.n_instances):
            self.wait_ready(i)
        status, data, _ = self.service(
            "PUT", "/v1/admin/webhooks/chaos",
            {"url": f"http://127.0.0.1:{self.receiver.port}/events",
             "events": ["message.finished"]}, key=KEY_ADMIN)
        if status != 200:
            raise SetupError(f"registering the webhook: HTTP {status} {data}")
        self.sim("POST", "/sim/faults", self.faults())
        self.note("faults on: " + json.dumps(self.faults()))

    def faults(self):
        return {"send": {"busy": 0.10, "http_500": 0.05, "drop_after_read": 0.05,
                         "latency_ms": [50, 200]},
                "seed": self.args.seed & 0x7FFFFFFF}

    # -- load ------------------------------------------------------------------------

    def openid(self, rng):
        return f"o-chaos-{self.run_id}-{rng.randrange(USERS):03d}"

    def record_report(self, kind_values, openid, data):
        rejected = {r.get("value") for r in (data or {}).get("rejected", [])}
        with self.lock:
            for kind, value in kind_values:
                if value not in rejected:
                    self.accepted_values[value] = (kind, openid)
                else:
                    self.counters["report_rejected"] += 1

    def guarded(self, name, step):
        """Runs a load loop; an unexpected error is counted and shown once, the loop goes on."""
        def loop(seed):
            rng = random.Random(seed)
            while not self.stop_load.is_set():
                try:
                    step(rng)
                except HttpFailure:
                    self.count(f"{name}_unanswered")
                except Exception:  # noqa: BLE001 - a driver bug must not end the load silently
                    self.count("driver_errors")
                    if self.counters["driver_errors"] == 1:
                        traceback.print_exc()
                    time.sleep(0.2)
        return loop

    def client_step(self, rng):
        """A mini-program: logs in (now and then again), reports form_ids from its form
        submits with its session; the report is retried until answered (the same values
        again are duplicates, not new uses)."""
        openid = self.openid(rng)
        session = self.session(rng, openid)
        if session is None:
            return
        forms = self.sim("POST", "/sim/form-ids",
                         {"appid": APP, "openid": openid, "count": rng.randint(1, 3)})["form_ids"]
        status, data, _ = self.service("POST", "/v1/client/credentials", {"form_ids": forms},
                                       key=session, tries=12, rng=rng)
        if status == 200:
            self.record_report([("form_id", f) for f in forms], openid, data)
            self.count("form_ids_accepted", data.get("accepted", 0))
        else:
            self.count(f"report_{status}")
            if status == 401:
                self.sessions.pop(openid, None)
            self.note(f"report {openid}: {status} {data}")
        time.sleep(rng.uniform(0.1, 0.3))

    def session(self, rng, openid):
        """The user's client session: logs in when it has none (and now and then again)."""
        session = self.sessions.get(openid)
        if session is None or rng.random() < 0.1:
            code = self.sim("POST", "/sim/codes", {"appid": APP, "openid": openid})["code"]
            status, data, _ = self.service("POST", "/v1/client/session", {"code": code},
                                           tries=12, rng=rng)
            if status != 200:
                self.count(f"session_{status}")
                self.note(f"login {openid}: {status} {data}")
                time.sleep(0.2)
                return None
            session = data["session"]
            self.sessions[openid] = session
            self.count("logins")
        return session

    def subscribe_step(self, rng):
        """A user taps "accept" in wx.requestSubscribeMessage: WeChat (the simulator)
        mints the one-time grants, and pushes their popup events when the pusher is on;
        the mini-program reports the accepts once (a retried report of an accept would
        be a second grant: subscriptions carry no value to deduplicate)."""
        openid = self.openid(rng)
        session = self.session(rng, openid)
        if session is None:
            return
        k = rng.randint(1, 3)
        self.sim("POST", "/sim/subscriptions",
                 {"appid": APP, "openid": openid, "template_id": SUB_TEMPLATE, "count": k})
        self.count("grants_minted", k)
        with self.lock:
            self.grants_minted[openid] += k
        body = {"subscriptions": [{"template_id": SUB_TEMPLATE, "result": "accept"}] * k}
        try:
            status, data, _ = self.service("POST", "/v1/client/credentials", body, key=session,
                                           tries=1, rng=rng)
        except HttpFailure:
            self.count("subscribe_unanswered")
            status, data = None, None
        if status == 200:
            self.count("grants_reported", data.get("accepted", 0))
        elif status is not None:
            self.count(f"subscribe_{status}")
            if status == 401:
                self.sessions.pop(openid, None)
            self.note(f"subscribe {openid}: {status} {data}")
        time.sleep(rng.uniform(0.1, 0.3))

    def register_prepay(self, rng, openids):
        """The backend registers prepay_ids (one per openid) with POST /v1/credentials."""
        items = []
        for openid in openids:
            pid = self.sim("POST", "/sim/prepay-ids",
                           {"appid": APP, "openid": openid, "count": 1,
                            "uses": PREPAY_USES})["prepay_ids"][0]
            items.append((openid, pid))
        if len(items) == 1:
            body = {"openid": items[0][0], "kind": "prepay_id", "value": items[0][1]}
        else:
            body = {"credentials": [{"openid": o, "kind": "prepay_id", "value": v}
                                    for o, v in items]}
        status, data, _ = self.service("POST", "/v1/credentials", body, key=KEY_SEND,
                                       tries=12, rng=rng)
        if status == 200:
            for openid, pid in items:
                self.record_report([("prepay_id", pid)], openid, data)
            self.count("prepay_ids_accepted", data.get("accepted", 0))
        else:
            self.count(f"register_{status}")
            self.note(f"register: {status} {data}")

    def backend_step(self, rng):
        """Payments the backend learns of: prepay_ids registered, alone or batched."""
        k = 1 if rng.random() < 0.6 else rng.randint(2, 5)
        self.register_prepay(rng, [self.openid(rng) for _ in range(k)])
        time.sleep(rng.uniform(0.4, 0.8))

    def new_tag(self):
        with self.lock:
            self.counters["tags"] += 1
            return f"m-{self.run_id}-{self.counters['tags']}"

    def sender_step(self, rng):
        """The backend notifies a user: POST /v1/messages. A quarter are payment cases
        (await_credential_s; the prepay_id is registered a moment later), a third carry
        an Idempotency-Key (retried on other instances until answered, and sometimes
        repeated after an answer: the same message must come back). Requests without a
        key are tried once: a lost answer stays lost, as for a real backend."""
        tag = self.new_tag()
        openid = self.openid(rng)
        template = TEMPLATE
        if rng.random() < SUB_SHARE:
            # A subscribe message, mostly to a user who subscribed.
            template = SUB_TEMPLATE
            with self.lock:
                subscribed = sorted(self.grants_minted)
            if subscribed and rng.random() < 0.9:
                openid = rng.choice(subscribed)
        body = {"openid": openid, "template_id": template, "page": f"pages/order?tag={tag}",
                "data": {"keyword1": {"value": tag}, "keyword2": {"value": "chaos"}}}
        payment = template == TEMPLATE and rng.random() < 0.25
        if payment:
            body["await_credential_s"] = rng.choice([3, 5, 8])
        headers = {}
        idem = rng.random() < 0.35
        if idem:
            key = f"idem-{tag}"
            headers["Idempotency-Key"] = key
            with self.lock:
                self.idem_tags[key] = tag
        try:
            status, data, _ = self.service("POST", "/v1/messages", body, key=KEY_SEND,
                                           headers=headers, tries=10 if idem else 1, rng=rng)
            if status in (200, 202):
                with self.lock:
                    self.message_ids.setdefault(tag, set()).add(data["id"])
                self.count("messages_accepted")
                if idem and rng.random() < 0.3:
                    time.sleep(rng.uniform(0, 0.3))
                    s2, d2, _ = self.service("POST", "/v1/messages", body, key=KEY_SEND,
                                             headers=headers, tries=10, rng=rng)
                    if s2 in (200, 202):
                        with self.lock:
                            self.message_ids[tag].add(d2["id"])
                        self.count("idempotent_repeats")
            else:
                self.count(f"message_{status}")
                self.note(f"message {tag}: {status} {data}")
        except HttpFailure:
            self.count("message_unanswered")
        if payment and rng.random() < 0.8:
            # The payment notification arrives a moment after the "notify" call.
            with self.lock:
                heapq.heappush(self.payments, (now() + rng.uniform(0.2, 2.0), openid))
        time.sleep(rng.uniform(0.02, 0.08))

    def payment_loop(self, seed):
        """The backend's payment notifications: a prepay_id for a user a message awaits.
        Runs until the load stops and the last due notification is registered."""
        rng = random.Random(seed)
        deadline = None
        while True:
            with self.lock:
                due = []
                while self.payments and self.payments[0][0] <= now() and len(due) < 20:
                    due.append(heapq.heappop(self.payments)[1])
                pending = len(self.payments)
            if due:
                try:
                    self.register_prepay(rng, due)
                except HttpFailure:
                    self.count("register_unanswered")
                except Exception:  # noqa: BLE001
                    self.count("driver_errors")
                    traceback.print_exc()
                continue
            if self.stop_load.is_set():
                deadline = deadline or now() + 10
                if not pending or now() > deadline:
                    return
            time.sleep(0.05)

    # -- chaos -----------------------------------------------------------------------

    def chaos_loop(self):
        rng = random.Random(self.args.seed ^ 0x5EED)
        seconds = self.args.seconds
        next_kill = now() + rng.uniform(2, 4)
        next_token = now() + rng.uniform(1, 3)
        db_restart_at = (self.t0 + seconds * rng.uniform(0.4, 0.6)
                         if self.backend == "postgres" else None)
        while not self.stop_chaos.is_set():
            t = now()
            if t >= next_token:
                try:
                    n = self.sim("POST", "/sim/tokens/invalidate", {"appid": APP})["invalidated"]
                    self.count("tokens_invalidated")
                    self.count("tokens_killed", n)
                except (HttpFailure, SetupError) as e:
                    self.note(f"token invalidation failed: {e}")
                next_token = t + rng.uniform(2, 4)
            if db_restart_at is not None and t >= db_restart_at:
                db_restart_at = None
                mode = os.environ.get("CHAOS_PG_RESTART_MODE") or rng.choice(["fast", "immediate"])
                self.note(f"restarting PostgreSQL (pg_ctl restart -m {mode})")
                t1 = now()
                try:
                    self.db.restart(mode)
                    self.note(f"PostgreSQL back after {now() - t1:.1f}s")
                except (SetupError, subprocess.TimeoutExpired) as e:
                    self.count("db_restart_failures")
                    self.note(f"PostgreSQL restart failed: {e}")
            if t >= next_kill:
                i = rng.randrange(self.n_instances)
                self.up[i] = False
                self.procs.kill9(f"ledger{i}")
                self.count("kills")
                self.note(f"kill -9 instance {i}")
                time.sleep(rng.uniform(0.1, 1.0))
                try:
                    self.start_instance(i)
                    self.note(f"instance {i} restarted")
                except SetupError as e:
                    self.note(f"instance {i} restart failed: {e}")
                    self.count("restart_failures")
                lo, hi = (2.5, 5) if self.n_instances > 1 else (3, 6)
                next_kill = now() + rng.uniform(lo, hi)
            self.stop_chaos.wait(0.05)

    # -- settle ----------------------------------------------------------------------

    def unfinished(self):
        return self.db.rows("SELECT id, status FROM messages "
                            "WHERE status NOT IN ('sent', 'no_quota', 'failed')")

    def settle(self):
        self.db.ensure_running()
        for i in range(self.n_instances):
            if not self.procs.alive(f"ledger{i}"):
                self.note(f"instance {i} is down at the end: starting it")
                self.start_instance(i)
            self.wait_ready(i)
        self.sim("POST", "/sim/faults", {})
        self.note("faults cleared; waiting for every message to be final")
        deadline = now() + self.args.settle
        left = None
        while now() < deadline:
            left = self.unfinished()
            if not left:
                break
            time.sleep(0.5)
        if left:
            self.note(f"{len(left)} messages still unfinished after {self.args.settle}s")
        else:
            self.note(f"all messages final {now() - self.t0:.1f}s after the start")
        # Deliveries come only from calls that settle messages; a short quiet period
        # lets any call still on the wire land before the record is read.
        time.sleep(0.5)
        # Webhook events of the last messages (and retries of refused ones).
        deadline = now() + 60
        while now() < deadline:
            pending = self.db.rows(
                "SELECT count(*) AS n FROM webhook_deliveries WHERE status = 'pending'")
            if not pending or int(pending[0]["n"]) == 0:
                break
            time.sleep(0.5)
        else:
            self.note("webhook deliveries still pending after 60 s")
        return left or []

    # -- checks ----------------------------------------------------------------------

    def check(self, unfinished):
        deliveries = self.sim("GET", "/sim/deliveries")
        stats = self.sim("GET", "/sim/stats")["calls"]
        messages = self.db.rows(
            "SELECT id, public_id, openid, template_id, status, error_code, wechat_errcode, "
            "credential_id, credential_kind, credential_value, credentials_tried, wechat_msgid, "
            "delivery, body FROM messages")
        creds = self.db.rows(
            "SELECT id, openid, kind, value, template_id, uses_total, uses_left, invalid, "
            "invalid_reason, reported_at, pushed_at FROM credentials")
        attempts = self.db.rows(
            "SELECT message_id, credential_id, wechat_errcode, outcome FROM message_attempts "
            "ORDER BY id")
        idem_rows = self.db.rows("SELECT key, message_id FROM idempotency_keys")
        if os.environ.get("CHAOS_SELFTEST_TAMPER") == "1":
            # Checks the checker: forget one delivery, invent one acknowledged value, and
            # deliver one message twice; the matching invariants must FAIL.
            gone = deliveries.pop(len(deliveries) // 2)
            twice = dict(deliveries[0], seq=10 ** 9)
            deliveries.append(twice)
            self.accepted_values["wx-never-stored"] = ("prepay_id", "o-nobody")
            self.note(f"self-test: removed delivery seq {gone['seq']}, repeated seq "
                      f"{deliveries[0]['seq']}, invented an acknowledged value")

        results = []   # (name, ok, detail, examples)

        def add(name, ok, detail, examples=()):
            results.append((name, bool(ok), detail, list(examples)[:6]))

        # Tie messages and deliveries by the tag.
        msg_by_id = {}
        msg_by_public = {}
        msgs_by_tag = collections.defaultdict(list)
        for m in messages:
            m["id"] = int(m["id"])
            try:
                tag = json.loads(m["body"])["data"]["keyword1"]["value"]
            except (ValueError, KeyError, TypeError):
                tag = None
            m["tag"] = tag
            msg_by_id[m["id"]] = m
            msg_by_public[m["public_id"]] = m
            msgs_by_tag[tag].append(m)
        dels_by_tag = collections.defaultdict(list)
        dels_by_cred = collections.defaultdict(list)
        for d in deliveries:
            tag = ((d.get("data") or {}).get("keyword1") or {}).get("value")
            d["tag"] = tag
            dels_by_tag[tag].append(d)
            if d.get("credential"):
                dels_by_cred[d["credential"]].append(d)
        cred_by_value = {c["value"]: c for c in creds if c["value"] is not None}
        cred_by_id = {int(c["id"]): c for c in creds}

        by_status = collections.Counter(
            m["status"] + ("/" + m["error_code"] if m["error_code"] else "") for m in messages)
        unknown = [m for m in messages if m["status"] == "failed"
                   and m["error_code"] == "outcome_unknown"]

        # 1. No credential use spent twice at WeChat.
        bad = []
        for value, ds in dels_by_cred.items():
            c = cred_by_value.get(value)
            limit = 1 if (c is None or c["kind"] == "form_id") else int(c["uses_total"])
            if c is not None and c["kind"] == "prepay_id" and int(c["uses_total"]) != PREPAY_USES:
                bad.append(f"prepay_id {value}: ledger uses_total {c['uses_total']} != {PREPAY_USES}")
            if len(ds) > limit:
                bad.append(f"{value} ({c and c['kind']}): {len(ds)} deliveries > {limit} uses: "
                           f"tags {[d['tag'] for d in ds]}")
            if c is None:
                bad.append(f"{value}: delivered but unknown to the ledger")
            elif any(d["touser"] != c["openid"] for d in ds):
                bad.append(f"{value}: delivered to another user")
        per_form = collections.Counter(len(ds) for v, ds in dels_by_cred.items()
                                       if cred_by_value.get(v, {}).get("kind") == "form_id")
        per_prepay = collections.Counter(len(ds) for v, ds in dels_by_cred.items()
                                         if cred_by_value.get(v, {}).get("kind") == "prepay_id")
        add("no use spent twice (deliveries/form_id <= 1, /prepay_id <= uses)", not bad,
            f"form_id deliveries histogram {dict(sorted(per_form.items()))}, "
            f"prepay_id {dict(sorted(per_prepay.items()))}", bad)

        # 2. Each message delivered at most once, and every delivery is a ledger message.
        bad = []
        for tag, ds in dels_by_tag.items():
            if len(ds) > 1:
                bad.append(f"tag {tag}: {len(ds)} deliveries (credentials "
                           f"{[d['credential'] for d in ds]}), messages "
                           f"{[m['id'] for m in msgs_by_tag.get(tag, [])]}")
            if tag not in msgs_by_tag:
                bad.append(f"delivery seq {ds[0]['seq']} tag {tag}: no such message in the ledger")
        add("each message delivered at most once", not bad,
            f"{len(deliveries)} deliveries for {len(dels_by_tag)} tags", bad)

        # 3. Every message final.
        bad = [f"message {m['id']} {m['status']}" for m in messages if m["status"] not in FINAL]
        add("every message final", not bad,
            f"{len(messages)} messages, {len(bad)} unfinished", bad)

        # 4. sent <=> delivered, except outcome_unknown.
        bad = []
        unknown_delivered = 0
        for m in messages:
            ds = dels_by_tag.get(m["tag"], [])
            if m["status"] == "sent":
                subscribe = m["credential_kind"] == "subscription"
                if len(ds) != 1:
                    bad.append(f"message {m['id']} sent, {len(ds)} deliveries (tag {m['tag']})")
                elif ds[0]["credential"] != m["credential_value"]:
                    bad.append(f"message {m['id']} sent with {m['credential_value']}, "
                               f"delivered with {ds[0]['credential']}")
                elif (ds[0]["kind"] == "subscribe") != subscribe:
                    bad.append(f"message {m['id']} sent with a {m['credential_kind']}, "
                               f"delivered as a {ds[0]['kind']} message")
                elif subscribe and str(ds[0]["msgid"]) != str(m["wechat_msgid"]):
                    # The msgid is WeChat's answer or the sent event's: either way the
                    # delivery's own.
                    bad.append(f"message {m['id']} sent with msgid {m['wechat_msgid']}, "
                               f"delivered with msgid {ds[0]['msgid']}")
            elif m["error_code"] == "outcome_unknown":
                unknown_delivered += len(ds)
            elif ds:
                bad.append(f"message {m['id']} {m['status']}/{m['error_code']} but delivered "
                           f"(seq {ds[0]['seq']}, credential {ds[0]['credential']}, "
                           f"dropped={ds[0]['response_dropped']})")
        sent = by_status.get("sent", 0)
        add("sent in ledger <=> delivered at simulator", not bad,
            f"{sent} sent, {len(deliveries)} deliveries, outcome_unknown {len(unknown)} "
            f"(of which delivered {unknown_delivered})", bad)

        # 5. outcome_unknown: few, and only where the ledger cannot know. A single-use
        #    credential is probed after an ambiguous call (41029 proves delivery), so it
        #    must never end unknown; a multi-use prepay_id or a subscription (a probe
        #    could spend the user's next grant) ends unknown only after a call that may
        #    have delivered (answer dropped / timed out: "ambiguous", or its worker
        #    killed mid-call: "interrupted").
        last_attempt = {}
        for a in attempts:
            last_attempt[int(a["message_id"])] = a   # rows come in id order per message
        bad = []
        for m in unknown:
            cred = cred_by_id.get(int(m["credential_id"])) if m["credential_id"] is not None else None
            last = last_attempt.get(m["id"])
            if cred is None or (int(cred["uses_total"]) == 1 and cred["kind"] != "subscription"):
                bad.append(f"message {m['id']}: outcome_unknown on a single-use credential "
                           f"{m['credential_kind']}:{m['credential_id']} (it could be probed)")
            elif last is None or last["outcome"] not in ("ambiguous", "interrupted"):
                bad.append(f"message {m['id']}: outcome_unknown after a "
                           f"{last and last['outcome']} attempt")
        limit = max(5, int(0.10 * max(1, len(messages))))
        if len(unknown) > limit:
            bad.insert(0, f"{len(unknown)} outcome_unknown > limit {limit}")
        reasons = collections.Counter(
            (last_attempt.get(m["id"]) or {}).get("outcome") for m in unknown)
        add("outcome_unknown few and justified", not bad,
            f"{len(unknown)} of {len(messages)} (limit {limit}; last attempt "
            f"{dict(reasons)}; {unknown_delivered} of them delivered)", bad)

        # 6. No accepted report lost.
        bad = []
        for value, (kind, openid) in self.accepted_values.items():
            c = cred_by_value.get(value)
            if c is None:
                bad.append(f"{kind} {value} of {openid}: acknowledged, not in the ledger")
            elif c["kind"] != kind or c["openid"] != openid:
                bad.append(f"{value}: ledger has {c['kind']} of {c['openid']}, "
                           f"reported {kind} of {openid}")
        add("no acknowledged report lost", not bad,
            f"{len(self.accepted_values)} acknowledged values, {len(creds)} in the ledger", bad)

        # 7. Uses: per credential, uses_total = uses_left + spent, where
        #    spent = deliveries with the value at the simulator
        #          + outcome_unknown messages holding it that were NOT delivered
        #            (charged because the ledger cannot know)
        #          + attempts WeChat answered as a bad credential (outcome credential_invalid),
        #            whose use stays charged by the contract.
        unknown_charge = collections.Counter()
        for m in unknown:
            if m["credential_id"] is not None and not dels_by_tag.get(m["tag"]):
                unknown_charge[int(m["credential_id"])] += 1
        invalid_charge = collections.Counter(
            int(a["credential_id"]) for a in attempts
            if a["outcome"] == "credential_invalid" and a["credential_id"] is not None)
        bad = []
        total_recorded = total_left = total_spent = 0
        for c in creds:
            if c["kind"] == "subscription":
                continue
            cid = int(c["id"])
            d = len(dels_by_cred.get(c["value"], []))
            spent = d + unknown_charge[cid] + invalid_charge[cid]
            total_recorded += int(c["uses_total"])
            total_left += int(c["uses_left"])
            total_spent += spent
            if int(c["uses_left"]) + spent != int(c["uses_total"]):
                bad.append(f"credential {cid} {c['kind']} {c['value']} ({c['openid']}): "
                           f"left {c['uses_left']} + spent {spent} (delivered {d}, unknown "
                           f"{unknown_charge[cid]}, invalid {invalid_charge[cid]}) != recorded "
                           f"{c['uses_total']}, invalid={c['invalid']}")
        add("uses left + uses spent = uses recorded (per credential)", not bad,
            f"{total_left} + {total_spent} vs {total_recorded} uses over {len(creds)} credentials",
            bad)

        # 8. Idempotency: one message per key, and every answer for a key is that message.
        bad = []
        for key, tag in self.idem_tags.items():
            rows = msgs_by_tag.get(tag, [])
            if len(rows) > 1:
                bad.append(f"key {key}: {len(rows)} messages {[m['id'] for m in rows]}")
            answered = self.message_ids.get(tag, set())
            if len(answered) > 1:
                bad.append(f"key {key}: answered with ids {sorted(answered)}")
        for tag, rows in msgs_by_tag.items():
            if len(rows) > 1 and f"idem-{tag}" not in self.idem_tags:
                # Tags are unique per request and keyless requests are never repeated.
                bad.append(f"tag {tag}: {len(rows)} messages {[m['id'] for m in rows]}")
        add("idempotency: one message per key", not bad,
            f"{len(self.idem_tags)} keys, {len(idem_rows)} stored, "
            f"{self.counters['idempotent_repeats']} repeated requests", bad)

        # 9. Every message the service answered for exists.
        bad = []
        for tag, ids in self.message_ids.items():
            for i in ids:
                m = msg_by_public.get(i)
                if m is None or m["tag"] != tag:
                    bad.append(f"message {i} (tag {tag}) answered 2xx, not in the ledger as such")
        add("every acknowledged message stored", not bad,
            f"{sum(len(v) for v in self.message_ids.values())} ids answered", bad)

        # 10. Subscribe sends settled by WeChat's sent events (the pusher): a subscribe
        #     message whose call may have delivered ends outcome_unknown unless a sent
        #     event proves it sent. Every message a push settled or gave a delivery
        #     has the simulator delivery of that msgid, with its own tag; without the
        #     pusher nothing can be settled that way.
        attempts_of = collections.defaultdict(list)
        for a in attempts:
            attempts_of[int(a["message_id"])].append(a["outcome"])
        del_by_msgid = {str(d["msgid"]): d for d in deliveries if d.get("msgid") is not None}
        subs = [m for m in messages if m["template_id"] == SUB_TEMPLATE]
        sub_unknown = [m for m in subs if m["error_code"] == "outcome_unknown"]
        resolved = [m for m in subs if m["status"] == "sent" and any(
            o in ("ambiguous", "interrupted") for o in attempts_of[m["id"]])]
        with_delivery = [m for m in messages if m["delivery"]]
        bad = []
        for m in resolved + with_delivery:
            d = del_by_msgid.get(str(m["wechat_msgid"]))
            if m["status"] != "sent":
                bad.append(f"message {m['id']} has a delivery but is {m['status']}")
            elif d is None:
                bad.append(f"message {m['id']} sent by a push with msgid {m['wechat_msgid']}: "
                           f"no such delivery at the simulator")
            elif d["tag"] != m["tag"] or d["touser"] != m["openid"]:
                bad.append(f"message {m['id']} (tag {m['tag']}) given msgid {m['wechat_msgid']}, "
                           f"which delivered tag {d['tag']} to {d['touser']}")
        if not self.push and (resolved or with_delivery):
            bad.insert(0, f"pusher off, yet {len(resolved)} resolved and {len(with_delivery)} "
                          f"with a delivery")
        sub_sent = sum(1 for m in subs if m["status"] == "sent")
        self.sub_figures = {
            "subscribe messages": len(subs), "sent": sub_sent,
            "outcome_unknown": len(sub_unknown),
            "outcome_unknown delivered": sum(1 for m in sub_unknown if dels_by_tag.get(m["tag"])),
            "resolved by push": len(resolved),
            "sent with a pushed delivery": sum(1 for m in subs if m["status"] == "sent"
                                               and m["delivery"]),
        }
        add("pushes settle only delivered subscribe sends", not bad,
            f"pusher {'on' if self.push else 'off'}: {len(subs)} subscribe messages, "
            f"{len(sub_unknown)} outcome_unknown, {len(resolved)} resolved by a sent event, "
            f"{len(with_delivery)} with a delivery", bad)

        # 11. No grant counted twice: per user, the ledger's subscriptions to the template
        #     (live or spent, reported and/or pushed) never outnumber the grants WeChat minted.
        rows_of = collections.Counter(c["openid"] for c in creds
                                      if c["kind"] == "subscription"
                                      and c["template_id"] == SUB_TEMPLATE)
        bad = [f"{o}: {n} subscriptions in the ledger > {self.grants_minted[o]} minted"
               for o, n in sorted(rows_of.items()) if n > self.grants_minted[o]]
        sub_rows = [c for c in creds if c["kind"] == "subscription"]
        both = sum(1 for c in sub_rows if c["reported_at"] and c["pushed_at"])
        pushed_only = sum(1 for c in sub_rows if c["pushed_at"] and not c["reported_at"])
        add("no grant counted twice", not bad,
            f"{sum(self.grants_minted.values())} minted, {len(sub_rows)} in the ledger "
            f"({both} reported and pushed, {pushed_only} pushed only)", bad)

        # Webhooks: every message that reached a final status produced its
        #     message.finished event at the receiver at least once (the receiver
        #     refused a share of the POSTs; the ledger retries until a 2xx), and each
        #     event names a message of this run.
        events, refused = self.receiver.snapshot()
        finished_ids = {mid for _, t, mid, _ in events if t == "message.finished"}
        final = [m for m in messages if m["status"] in ("sent", "no_quota", "failed")]
        bad = [f"message {m['public_id']} ({m['status']}): no message.finished event"
               for m in final if m["public_id"] not in finished_ids]
        bad += [f"event {eid} names {mid}, not a message of this run"
                for eid, _, mid, _ in events if mid not in msg_by_public][:5]
        ids = collections.Counter(eid for eid, _, _, _ in events)
        add("every final message's webhook event arrived", not bad,
            f"{len(final)} final messages, {len(ids)} events received "
            f"({sum(n - 1 for n in ids.values())} again), {refused} POSTs refused (503)", bad)

        self.last_deliveries = deliveries
        self.tag_of = {m["id"]: m["tag"] for m in messages}
        self.public_of = {m["id"]: m["public_id"] for m in messages}
        return results, {
            "deliveries": deliveries, "stats": stats, "messages": messages,
            "by_status": by_status, "unknown": unknown, "attempts": attempts,
        }

    def explain(self, results):
        """For failed invariants: the message resources of a few messages involved."""
        ids = []
        for name, ok, _, examples in results:
            if ok:
                continue
            for e in examples:
                for word in e.replace(",", " ").split():
                    if word.isdigit() and e.startswith("message " + word):
                        ids.append(word)
        live = [p for i, p in enumerate(self.ports) if self.procs.alive(f"ledger{i}")]
        for mid in ids[:4]:
            if not live:
                break
            try:
                public = self.public_of.get(int(mid), mid)
                status, data = request(live[0], "GET", f"/v1/messages/{public}",
                                       headers={"Authorization": f"Bearer {KEY_SEND}"})
                print(f"  GET /v1/messages/{mid} -> {status} {json.dumps(data)}")
                for d in self.last_deliveries:
                    if (d.get("data") or {}).get("keyword1", {}).get("value") == self.tag_of.get(int(mid)):
                        print(f"    simulator delivery: {json.dumps(d)}")
            except HttpFailure as e:
                print(f"  GET /v1/messages/{mid}: {e}")

    def report(self, results, facts):
        stats = facts["stats"]
        send = collections.Counter()
        for api in ("template_send", "subscribe_send"):
            send.update(stats.get(api, {}))
        injected_busy = send.get("injected_busy", 0)
        injected_500 = send.get("injected_http_500", 0)
        dropped = sum(v for k, v in send.items() if k.startswith("dropped:"))
        c = self.counters
        print()
        print(f"=== chaos run: {self.backend}, {self.n_instances} instance(s), "
              f"{self.args.seconds}s of load, seed {self.args.seed} ===")
        rows = [
            ("messages (ledger)", len(facts["messages"])),
            ("  by status", ", ".join(f"{k} {v}" for k, v in sorted(facts["by_status"].items()))),
            ("deliveries (simulator)", len(facts["deliveries"])),
            ("  with the answer dropped", sum(1 for d in facts["deliveries"] if d["response_dropped"])),
            ("send calls (simulator)", sum(send.values())),
            ("  outcomes", ", ".join(f"{k} {v}" for k, v in sorted(send.items()))),
            ("faults injected", f"{injected_busy + injected_500 + dropped} "
                                f"(busy -1: {injected_busy}, HTTP 500: {injected_500}, "
                                f"dropped after read: {dropped})"),
            ("token invalidations", f"{c['tokens_invalidated']} ({c['tokens_killed']} live tokens killed)"),
            ("token calls", ", ".join(f"{api} {sum(v.values())}" for api, v in sorted(stats.items())
                                      if "token" in api)),
            ("kill -9", c["kills"]),
            ("database restarts", f"{self.db.restarts}"
                                  f"{' (' + self.db.restart_mode + ')' if self.db.restarts else ''}"),
            ("credentials acknowledged", f"{len(self.accepted_values)} "
                                         f"(form_id {c['form_ids_accepted']} new, "
                                         f"prepay_id {c['prepay_ids_accepted']} new)"),
            ("logins", c["logins"]),
            ("pusher", "on (CHAOS_PUSH=1)" if self.push else "off (CHAOS_PUSH=0)"),
            ("grants", f"{c['grants_minted']} minted, {c['grants_reported']} reported "
                       f"({c['subscribe_unanswered']} reports unanswered)"),
            ("subscribe messages", ", ".join(f"{k} {v}" for k, v in self.sub_figures.items())),
            ("messages acknowledged", f"{c['messages_accepted']} "
                                      f"(+{c['idempotent_repeats']} idempotent repeats)"),
            ("requests without answer", f"{c['http_no_answer']} tries "
                                        f"(messages lost {c['message_unanswered']}, reports "
                                        f"{c['report_unanswered']}, registrations "
                                        f"{c['register_unanswered']})"),
            ("driver errors", c["driver_errors"]),
            ("5xx answers", ", ".join(f"{k} {v}" for k, v in sorted(c.items())
                                      if k.startswith("http_5")) or "0"),
        ]
        w = max(len(r[0]) for r in rows)
        for k, v in rows:
            print(f"  {k:<{w}}  {v}")
        print()
        w = max(len(r[0]) for r in results)
        print(f"  {'invariant':<{w}}  result  detail")
        print(f"  {'-' * w}  ------  {'-' * 40}")
        for name, ok, detail, examples in results:
            print(f"  {name:<{w}}  {'PASS' if ok else 'FAIL':<6}  {detail}")
            if not ok:
                for e in examples:
                    print(f"  {'':<{w}}          - {e}")
        print()

    # -- main ------------------------------------------------------------------------

    def run(self):
        self.setup()
        threads = []
        for k in range(2):
            threads.append(threading.Thread(target=self.guarded("report", self.client_step),
                                            args=(self.rng.random(),), name=f"client{k}",
                                            daemon=True))
        for k in range(2):
            threads.append(threading.Thread(target=self.guarded("subscribe", self.subscribe_step),
                                            args=(self.rng.random(),), name=f"subscriber{k}",
                                            daemon=True))
        threads.append(threading.Thread(target=self.guarded("register", self.backend_step),
                                        args=(self.rng.random(),), name="backend", daemon=True))
        threads.append(threading.Thread(target=self.payment_loop, args=(self.rng.random(),),
                                        name="payments", daemon=True))
        for k in range(4):
            threads.append(threading.Thread(target=self.guarded("message", self.sender_step),
                                            args=(self.rng.random(),), name=f"sender{k}",
                                            daemon=True))
        chaos = threading.Thread(target=self.chaos_loop, name="chaos", daemon=True)
        self.t0 = now()
        self.note(f"load and chaos for {self.args.seconds}s")
        for t in threads:
            t.start()
        chaos.start()
        self.stop_load.wait(self.args.seconds)
        self.stop_load.set()
        self.stop_chaos.set()
        # Every load step is bounded (tries x timeouts), and so is the wait for it.
        deadline = now() + 120
        for t in [chaos] + threads:
            t.join(timeout=max(0.1, deadline - now()))
        stuck = [t.name for t in threads + [chaos] if t.is_alive()]
        if stuck:
            self.note(f"threads still running after the bound: {stuck}")
        self.note("load stopped")
        unfinished = self.settle()
        results, facts = self.check(unfinished)
        self.report(results, facts)
        if not all(ok for _, ok, _, _ in results):
            self.explain(results)
            return 1
        return 0

    def cleanup(self):
        self.stop_load.set()
        self.stop_chaos.set()
        self.receiver.stop()
        self.procs.kill_all()
        try:
            self.db.stop()
        except Exception as e:  # noqa: BLE001 - best effort at exit
            print(f"stopping the database: {e}", file=sys.stderr)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backend", choices=["postgres", "sqlite"], required=True)
    p.add_argument("--bin", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--seconds", type=int, default=60)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--settle", type=int, default=int(os.environ.get("CHAOS_SETTLE_S", "120")))
    args = p.parse_args()
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    os.makedirs(args.work, exist_ok=True)
    chaos = Chaos(args)

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        return chaos.run()
    except SetupError as e:
        print(f"chaos driver ({args.backend}): setup failed: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        print(f"chaos driver ({args.backend}): interrupted", file=sys.stderr)
        return e.code if isinstance(e.code, int) else 2
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 2
    finally:
        chaos.cleanup()


if __name__ == "__main__":
    sys.exit(main())
