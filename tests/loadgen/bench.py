#!/usr/bin/env python3
"""Ferrule's benchmark suite: Ferrule against a peer (Mosquitto, bare hyper) on this machine.

    python3 tests/loadgen/bench.py            # full suite: release build, >= 3 runs each, writes BENCHMARKS.md
    python3 tests/loadgen/bench.py --smoke    # tiny counts, debug binaries, < 90 s, exit 1 on any failure
    python3 tests/loadgen/bench.py --only qos0,http --runs 5 --scale 0.5

Every scenario drives real sockets with `ferrule-loadgen` (tests/loadgen/src), which prints
one JSON line of results per process. Ferrule runs from a generated config on ephemeral
ports (read back from DATA_DIR/listeners.json) with a tenant `bench` provisioned over the
management API; Mosquitto from a generated config. Python 3 standard library only.
"""
# Size: one self-contained file (standard library only, runnable from a clean checkout):
# process control, the servers, one method per scenario, and the report.
import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ANALYSIS_MARKER = "<!-- analysis -->"
TENANT = "bench"
APP_USER, APP_PASSWORD = "app@bench", "bench-app-secret"
DEVICE_PASSWORD = "bench-device-pw"
TOKEN = "bench-operator-token-0123456789"
CLK_TCK = os.sysconf("SC_CLK_TCK")
IDLE_SOURCES = ",".join(f"127.0.0.{i}" for i in range(2, 10))
STORM_SOURCES = ",".join(f"127.0.0.{i}" for i in range(10, 18))

SCENARIOS = ["qos0", "qos1", "gateway", "events", "http", "coap", "idle", "storm", "restart", "commands", "flow", "peer", "overload",
             "isolation", "scaleout"]
# Run only when named in --only (they take longer than the default set allows, or need more than Ferrule).
OPT_IN = ["isolation", "scaleout"]
# Reported in their own block of BENCHMARKS.md (below the analysis marker), merged into the file
# rather than rewriting it when they are all that ran.
MERGED = ["scaleout"]
# Messages (requests, commands, devices) per run: (full mode, smoke mode); --scale multiplies the first.
COUNTS = {"qos0": (200_000, 2_000), "qos1": (50_000, 1_000), "gateway": (50_000, 1_000), "events": (100_000, 1_000), "http": (100_000, 1_000),
          "coap": (100_000, 1_000), "commands": (50_000, 500), "storm-devices": (100, 10),
          "restart-devices": (10_000, 100),
          "flow": (100_000, 2_000), "peer": (200_000, 2_000)}

# QoS 1 publishers x window unless given on the command line: the peer sweep (scenario
# `peer`) shows Mosquitto's QoS 1 figure still rising up to 16 publishers x 100 in flight
# (8 x 16 under-drove it by about 10 %); QoS 0 is flat from 4 x 16 on.
QOS1_SHAPE = (16, 100)
# Gateway scenario: each publisher connection is a gateway publishing for this many devices in turn.
GATEWAY_DEVICES = 16
# Flow-control shapes (issue 18): (label, publisher connections, QoS 1 window each).
FLOW_SHAPES = [("10x100", 10, 100), ("1000x1", 1000, 1)]
FLOW_CREDITS = [1000, 100]
# Peer sweep: publisher connections x window, to show where Mosquitto stops scaling.
PEER_SWEEP = {0: [(4, 16), (8, 16), (16, 16), (32, 16)], 1: [(8, 16), (16, 16), (8, 100), (16, 100), (32, 100)]}
# Isolation (issue 17): tenant B (well-behaved) beside tenant A (hostile, tests/loadgen/hostile_tenant.py).
# B: MQTT QoS 1 devices at a fixed total rate to its AMQP application. A: more MQTT connections than its
# `resource-limits.max-connections`, telemetry far over the instance's per-tenant rate, and an AMQP
# application sending a 64 MiB event, a body nested 50,000 lists deep, and attaching receivers on
# 10,000 fresh reply addresses. (full, smoke) where they differ.
ISO_A, ISO_B = "iso-a", "iso-b"
ISO = {"b_devices": 5, "b_rate": 200, "a_max_connections": 20, "a_connections": 30, "a_rate": 5000,
       "tenant_rate": 500, "big_mib": 64, "depth": 50_000, "receivers": (10_000, 1_000), "seconds": (15, 3)}
HOSTILE_TENANT = Path(__file__).resolve().parent / "hostile_tenant.py"
# Scale-out (issue 14): 1, 2 and 3 `ferrule serve` instances in cluster mode over one RabbitMQ node (AMQP 1.0
# plugin) and a 3-master Redis Cluster (tests/cluster/brokers.sh), against the broker's own ceiling: a plain
# AMQP 1.0 producer and consumer (`amqp-send`, `amqp-recv`) on queues of the same kinds. Devices spread evenly
# over the instances (12 divides by 1, 2 and 3); the application on the first instance. Brokers on their own
# ports (not the cluster tests' 25xxx/27xxx), so that both can run at once.
SCALEOUT = {"instances": [1, 2, 3], "count": (20_000, 500), "devices": 12, "window": 80, "credit": 5000}
# Below the ephemeral range (32768-), Redis cluster bus ports (+10000) included.
SCALEOUT_PORTS = {"RABBIT_PORT": 21680, "RABBIT_HTTP_PORT": 21690, "RABBIT_DIST_PORT": 21700, "RABBIT_TLS_PORT": 21670,
                  "EPMD_PORT": 21369, "REDIS_PORT": 22000}
BROKERS_SH = ROOT / "tests" / "cluster" / "brokers.sh"
# The telemetry policy Ferrule makes at start (src/cluster.rs, RabbitAdmin::telemetry_policy): made by the bench
# too, identically, so that the ceiling's telemetry queue (measured before any Ferrule runs) is the same kind.
TELEMETRY_POLICY = {"pattern": "^telemetry\\.", "apply-to": "queues", "priority": 0,
                    "definition": {"message-ttl": 2000, "max-length": 100000, "overflow": "drop-head", "expires": 60000}}
SCALEOUT_BEGIN = "<!-- scaleout:begin (bench.py --only scaleout rewrites this block; keep notes outside it) -->"
SCALEOUT_END = "<!-- scaleout:end -->"

T0 = time.time()


def log(msg):
    print(f"[bench {time.time() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class Failure(Exception):
    pass


# ---------------------------------------------------------------------------------------
# processes

def raise_nofile():
    """preexec_fn: as many file descriptors as allowed (root with CAP_SYS_RESOURCE: 1M)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def nofile_limit():
    """The RLIMIT_NOFILE our children get (after raise_nofile)."""
    out = subprocess.run([sys.executable, "-c", "import resource,sys\n"
                          "try: resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20))\n"
                          "except Exception:\n h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; resource.setrlimit(resource.RLIMIT_NOFILE, (h, h))\n"
                          "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"], capture_output=True, text=True)
    return int(out.stdout.strip() or 1024)


def cpu_seconds(pid):
    """user + system CPU seconds of a running process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RUNNING = []  # every process we started and have not reaped


class Proc:
    """A child process with stdout/stderr in files; reaped with wait4 for its CPU time."""

    def __init__(self, suite, name, argv, stdin=False, display=None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.display = display
        n = suite.next_id()
        self.out_path = suite.workdir / f"{n:03d}-{name}.out"
        self.err_path = suite.workdir / f"{n:03d}-{name}.err"
        self.out = open(self.out_path, "wb")
        self.err = open(self.err_path, "wb")
        suite.commands_log.write(" ".join(self.argv) + "\n")
        self.proc = subprocess.Popen(self.argv, stdout=self.out, stderr=self.err,
                                     stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     preexec_fn=raise_nofile, cwd=suite.workdir)
        self.pid = self.proc.pid
        self.cpu = None
        self.returncode = None
        RUNNING.append(self)

    def poll(self):
        if self.returncode is not None:
            return self.returncode
        pid, status, ru = os.wait4(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        self._reaped(status, ru)
        return self.returncode

    def _reaped(self, status, ru):
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode
        self.cpu = ru.ru_utime + ru.ru_stime
        self.out.close()
        self.err.close()
        if self in RUNNING:
            RUNNING.remove(self)

    def wait(self, timeout):
        deadline = time.time() + timeout
        while self.poll() is None:
            if time.time() > deadline:
                self.kill()
                raise Failure(f"{self.name} did not finish within {timeout:.0f} s; stderr: {self.stderr_tail()}")
            time.sleep(0.01)
        return self.returncode

    def kill(self):
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status, ru = os.wait4(self.pid, 0)
            self._reaped(status, ru)

    def terminate(self, timeout=20):
        if self.returncode is None:
            try:
                if self.proc.stdin:
                    self.proc.stdin.close()
                os.kill(self.pid, signal.SIGTERM)
            except (ProcessLookupError, BrokenPipeError):
                pass
            try:
                self.wait(timeout)
            except Failure:
                pass

    def stderr_tail(self, n=1500):
        try:
            return self.err_path.read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def json_lines(self):
        out = []
        for line in self.out_path.read_text(errors="replace").splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def result(self, timeout):
        """Waits for the process and returns its JSON result line."""
        self.wait(timeout)
        lines = self.json_lines()
        if self.returncode != 0 or not lines:
            raise Failure(f"{self.name} exited with {self.returncode}: {self.stderr_tail()}")
        r = lines[-1]
        r["_cpu"] = self.cpu
        return r

    def first_line(self, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            lines = self.json_lines()
            if lines:
                return lines[0]
            if self.poll() is not None:
                raise Failure(f"{self.name} exited with {self.returncode}: {self.stderr_tail()}")
            time.sleep(0.05)
        raise Failure(f"{self.name}: no result within {timeout:.0f} s: {self.stderr_tail()}")


def wait_file(path, proc, timeout):
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise Failure(f"{proc.name} exited with {proc.returncode} before it was ready: {proc.stderr_tail()}")
        if time.time() > deadline:
            raise Failure(f"{proc.name} not ready within {timeout:.0f} s")
        time.sleep(0.02)
    return path.read_text()


# ---------------------------------------------------------------------------------------
# servers

FERRULE_CONFIG = """\
data_dir = "{data_dir}"
[log]
level = "warn"
[ops]
listen = "127.0.0.1:0"
[messaging]
listen = "127.0.0.1:0"
listen_tls = "127.0.0.1:0"
[messaging.sasl]
users = [{{ username = "{app_user}", password = "{app_password}" }}]
[registry]
bind = "127.0.0.1:0"
auth_tokens = ["{token}"]
{registry_extra}
[adapters.http]
listen = "127.0.0.1:0"
listen_tls = "127.0.0.1:0"
allow_unauthenticated = true
max_connections = 100000
{http_extra}
[adapters.mqtt]
listen = "127.0.0.1:0"
allow_unauthenticated = true
max_connections = 1000000
{mqtt_extra}
[adapters.coap]
listen = "127.0.0.1:0"
listen_dtls = "127.0.0.1:0"
allow_unauthenticated = true
{coap_extra}
"""

# The load generator plays thousands of devices from one host: lift the per-source limits
# (which would otherwise rightly throttle it) where the binary under test has them.
SOURCE_LIMITS_OFF = {  # [adapters.X] -> keys
    "http": "max_connections_per_ip = 1000000\nconnection_rate_per_ip = 1000000.0\nconnection_burst_per_ip = 1000000",
    "coap": "reply_rate_per_ip = 1000000",
    "mqtt": "max_connections_per_ip = 1000000\nconnection_rate_per_ip = 1000000.0\nconnection_burst_per_ip = 1000000",
    # Provisioning a thousand devices opens a connection per call.
    "registry": "max_connections_per_ip = 1000000\nconnection_rate_per_ip = 1000000.0\nconnection_burst_per_ip = 1000000",
}


def supported_keys(ferrule_bin):
    """The config keys `ferrule_bin` knows, as "section.key" (from `config print-default`)."""
    try:
        out = subprocess.run([str(ferrule_bin), "config", "print-default"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return set()
    keys, section = set(), ""
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif "=" in line and not line.startswith("#"):
            keys.add(f"{section}.{line.split('=', 1)[0].strip()}")
    return keys


def limits_off(keys):
    """SOURCE_LIMITS_OFF by section ("mqtt", "http", "coap", "registry"), each empty where
    the binary under test does not know the keys (`keys`: supported_keys())."""
    section = lambda k: k if k == "registry" else f"adapters.{k}"  # noqa: E731
    return {k: (v if f"{section(k)}.{v.split(' =', 1)[0]}" in keys else "") for k, v in SOURCE_LIMITS_OFF.items()}


class Ferrule:
    peer = False
    label = "Ferrule"

    def __init__(self, suite, name, devices=0, passwords=True, verifier_key=False, gateways=0):
        self.suite = suite
        self.name = name
        self.devices = devices
        self.gateways = gateways
        self.passwords = passwords
        self.provisioned = False
        self.make_dirs(suite, name)
        keys = suite.supported_keys()
        off = limits_off(keys)
        extra = f"workers = {suite.args.mqtt_workers}" if suite.args.mqtt_workers else ""
        extra += "\n" + off["mqtt"]
        registry_extra = off["registry"]
        if verifier_key and "registry.verifier_file" in keys:
            # Kept apart from the data directory, as ferrule requires ([registry] verifier_key_file).
            key = self.dir / "secrets" / "verifier-key"
            key.parent.mkdir(mode=0o700)
            key.write_bytes(os.urandom(32))
            registry_extra += f'\nverifier_key_file = "{key}"'
        self.config.write_text(FERRULE_CONFIG.format(data_dir=self.data, app_user=APP_USER, app_password=APP_PASSWORD,
                                                     token=TOKEN, mqtt_extra=extra, http_extra=off["http"],
                                                     coap_extra=off["coap"], registry_extra=registry_extra))
        self.proc = None

    def make_dirs(self, suite, name):
        """The server's own directory, data directory (mode 0700, as ferrule makes it: no
        warning) and config path under the suite's workdir."""
        self.dir = suite.workdir / f"ferrule-{name}-{suite.next_id()}"
        self.data = self.dir / "data"
        self.data.mkdir(parents=True, mode=0o700)
        self.config = self.dir / "ferrule.toml"

    def start(self):
        self.proc = Proc(self.suite, f"ferrule-{self.name}", [self.suite.ferrule_bin, "serve", "--config", self.config])
        listeners = self.data / "listeners.json"
        wait_file(listeners, self.proc, 60)
        time.sleep(0.05)
        self.listeners = json.loads(listeners.read_text())
        if (self.devices or self.gateways) and not self.provisioned:
            self.provision(self.devices, self.passwords)
            self.provision_gateways(self.gateways)
            self.provisioned = True
        return self

    def restart(self):
        """SIGTERM, then a fresh process over the same data directory."""
        self.proc.terminate()
        (self.data / "listeners.json").unlink(missing_ok=True)
        return self.start()

    @property
    def pid(self):
        return self.proc.pid

    def addrs(self):
        return {k: self.listeners[k] for k in ("mqtt", "amqp", "http", "coap", "ops")}

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.listeners['registry']}{path}", data=data, method=method)
        req.add_header("authorization", f"Bearer {TOKEN}")
        if data is not None:
            req.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            if e.code == 409:
                return e.code
            raise Failure(f"registry {method} {path}: {e.code} {e.read()[:300]!r}")

    def provision(self, devices, passwords=True):
        """Tenant `bench` (unauthenticated devices allowed on every adapter), devices dev0..,
        each with the password credential `devN` / DEVICE_PASSWORD."""
        self.call("POST", f"/v1/tenants/{TENANT}", {"enabled": True, "adapters": [
            {"type": t, "enabled": True, "device-authentication-required": False}
            for t in ("hono-http", "hono-mqtt", "hono-coap")]})

        def one(i):
            self.call("POST", f"/v1/devices/{TENANT}/dev{i}", {"enabled": True})
            if passwords:
                self.call("PUT", f"/v1/credentials/{TENANT}/dev{i}",
                          [{"type": "hashed-password", "auth-id": f"dev{i}", "secrets": [{"pwd-plain": DEVICE_PASSWORD}]}])

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(devices)))
        return self

    def provision_gateways(self, gateways):
        """Gateways gw0.. (password DEVICE_PASSWORD), each with GATEWAY_DEVICES devices gwN-dK
        that name it in `via`."""
        def one(i):
            self.call("POST", f"/v1/devices/{TENANT}/gw{i}", {"enabled": True})
            self.call("PUT", f"/v1/credentials/{TENANT}/gw{i}",
                      [{"type": "hashed-password", "auth-id": f"gw{i}", "secrets": [{"pwd-plain": DEVICE_PASSWORD}]}])
            for k in range(GATEWAY_DEVICES):
                self.call("POST", f"/v1/devices/{TENANT}/gw{i}-d{k}", {"enabled": True, "via": [f"gw{i}"]})

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(gateways)))
        return self

    def metric(self, name, labels):
        """A counter from /metrics (0 if absent)."""
        try:
            with urllib.request.urlopen(f"http://{self.listeners['ops']}/metrics", timeout=10) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        want = "{" + labels + "}"
        for line in text.splitlines():
            if line.startswith(name + want):
                return float(line.split()[-1])
        return 0.0

    def dropped(self):
        return self.metric("ferrule_direct_dropped_total", f'address="telemetry/{TENANT}"')

    def stop(self):
        if self.proc:
            self.proc.terminate()
            if self.proc.returncode not in (0, None):
                log(f"ferrule exited with {self.proc.returncode}: {self.proc.stderr_tail(500)}")
            text = self.proc.err_path.read_text(errors="replace") + self.proc.out_path.read_text(errors="replace")
            lines = [re.sub(r"\x1b\[[0-9;]*m", "", l) for l in text.splitlines()]
            warnings = [l for l in lines if re.search(r"\b(ERROR|WARN)\b|panicked", l)]
            if warnings:
                self.suite.server_errors.append((self.name, len(warnings), warnings[:3]))


class IsolationFerrule(Ferrule):
    """Ferrule for the isolation scenario: applications `app@iso-a` and `app@iso-b`, the
    per-tenant message rate `ISO["tenant_rate"]` ([adapters] max_messages_per_second_per_tenant),
    tenant B with `b_devices` devices and tenant A with `a_connections` devices and
    `resource-limits.max-connections` = `a_max_connections`."""

    def __init__(self, suite, name):
        super().__init__(suite, name)
        if "adapters.max_messages_per_second_per_tenant" not in suite.supported_keys():
            raise Failure(f"{suite.ferrule_bin} has no [adapters] max_messages_per_second_per_tenant")
        text = self.config.read_text()
        users = ", ".join(f'{{ username = "app@{t}", password = "{APP_PASSWORD}" }}' for t in (ISO_A, ISO_B))
        old = f'users = [{{ username = "{APP_USER}", password = "{APP_PASSWORD}" }}]'
        assert old in text, "FERRULE_CONFIG changed: update IsolationFerrule"
        text = text.replace(old, f"users = [{users}]")
        # A super-table after its sub-tables is valid TOML.
        text += f"\n[adapters]\nmax_messages_per_second_per_tenant = {ISO['tenant_rate']}\n"
        self.config.write_text(text)

    def start(self):
        super().start()
        self.call("POST", f"/v1/tenants/{ISO_B}", {"enabled": True})
        self.call("POST", f"/v1/tenants/{ISO_A}", {"enabled": True,
                                                   "resource-limits": {"max-connections": ISO["a_max_connections"]}})

        def one(job):
            tenant, i = job
            self.call("POST", f"/v1/devices/{tenant}/dev{i}", {"enabled": True})
            self.call("PUT", f"/v1/credentials/{tenant}/dev{i}",
                      [{"type": "hashed-password", "auth-id": f"dev{i}", "secrets": [{"pwd-plain": DEVICE_PASSWORD}]}])

        jobs = [(ISO_B, i) for i in range(ISO["b_devices"])] + [(ISO_A, i) for i in range(ISO["a_connections"])]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(one, jobs))
        return self

    def counters(self):
        """Every refusal-like counter series (`ferrule_*refus*`, `*reject*`, `*revoked*`,
        `*limit*`) from /metrics: {series with labels: value}."""
        try:
            with urllib.request.urlopen(f"http://{self.listeners['ops']}/metrics", timeout=10) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            m = re.match(r"^(ferrule_\w*(?:refus|reject|revoked|limit)\w*(?:\{[^}]*\})?) (\S+)$", line)
            if m:
                try:
                    out[m.group(1)] = float(m.group(2))
                except ValueError:
                    pass
        return out


CLUSTER_CONFIG = """\
data_dir = "{data_dir}"
[log]
level = "warn"
[ops]
listen = "127.0.0.1:0"
[messaging]
listen = "127.0.0.1:0"
listen_tls = "127.0.0.1:0"
[messaging.sasl]
users = [{{ username = "app@*", password = "{app_password}" }}]
[messaging.backend]
kind = "amqp"
urls = ["amqp://{amqp}"]
username = "guest"
password = "guest"
addresses = "rabbitmq"
management_url = "http://{http}"
outcome_timeout = "5s"
{backend_extra}
[commands]
request_id_key = "bench-scaleout-request-id-key-0123456789"
[cluster]
instance_id = "{instance}"
redis_urls = {redis}
roles = ["devices", "applications", "management"]
peer_password = "bench-scaleout-peer-secret"
[registry]
listen = "127.0.0.1:0"
storage = "redis"
redis_cluster_nodes = {redis}
redis_key_prefix = "{prefix}"
auth_tokens = ["{token}"]
{registry_extra}
[adapters.http]
listen = "127.0.0.1:0"
listen_tls = "127.0.0.1:0"
[adapters.mqtt]
listen = "127.0.0.1:0"
listen_tls = "127.0.0.1:0"
{mqtt_extra}
[adapters.coap]
listen = "127.0.0.1:0"
listen_dtls = "127.0.0.1:0"
"""


class ClusterBrokers:
    """RabbitMQ (one node, AMQP 1.0 + management plugins) and a Redis Cluster of 3 masters,
    started and stopped by tests/cluster/brokers.sh under the workdir, on SCALEOUT_PORTS."""

    def __init__(self, suite):
        self.suite = suite
        self.base = suite.workdir / "brokers"
        self.base.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "BASE": str(self.base), **{k: str(v) for k, v in SCALEOUT_PORTS.items()}}
        self.amqp = f"127.0.0.1:{SCALEOUT_PORTS['RABBIT_PORT'] + 1}"
        self.http = f"127.0.0.1:{SCALEOUT_PORTS['RABBIT_HTTP_PORT'] + 1}"
        self.redis = [f"redis://127.0.0.1:{SCALEOUT_PORTS['REDIS_PORT'] + i}/" for i in (1, 2, 3)]
        self.started = []

    def sh(self, *args):
        cmd = [str(BROKERS_SH), *args]
        self.suite.commands_log.write(" ".join(f"{k}={v}" for k, v in SCALEOUT_PORTS.items()) + f" BASE={self.base} "
                                      + " ".join(cmd) + "\n")
        with open(self.base / "brokers.log", "ab") as out:
            r = subprocess.run(cmd, env=self.env, stdout=out, stderr=out, timeout=180)
        if r.returncode != 0:
            tail = (self.base / "brokers.log").read_text(errors="replace")[-800:]
            raise Failure(f"brokers.sh {' '.join(args)} exited with {r.returncode}: {tail}")

    def start(self):
        busy = []
        for port in [SCALEOUT_PORTS["RABBIT_PORT"] + 1, SCALEOUT_PORTS["RABBIT_HTTP_PORT"] + 1, SCALEOUT_PORTS["EPMD_PORT"],
                     SCALEOUT_PORTS["RABBIT_DIST_PORT"] + 1] + [SCALEOUT_PORTS["REDIS_PORT"] + i for i in (1, 2, 3)]:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the brokers do (TIME-WAIT is fine)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    busy.append(port)
        if busy:
            raise Failure(f"ports {busy} are in use (a previous scale-out run's brokers still running?)")
        t0 = time.time()
        self.started.append("redis")
        self.sh("redis-start", "3", "0")
        self.started.append("rabbit")
        self.sh("rabbit-start", "1")
        log(f"scaleout: RabbitMQ and Redis Cluster up in {time.time() - t0:.1f} s")
        return self

    def stop(self):
        for kind, args in (("rabbit", ("rabbit-stop", "1")), ("redis", ("redis-stop", "3"))):
            if kind in self.started:
                try:
                    self.sh(*args)
                except Exception as e:  # noqa: BLE001 (stop the other one anyway)
                    log(f"scaleout: stopping {kind}: {e}")
                self.started.remove(kind)

    def pids(self):
        """{"beam.smp": pid, "redis": [pids]} of the running brokers."""
        out = {"redis": []}
        try:
            out["beam.smp"] = int((self.base / "rabbit" / "n1" / "pid").read_text().split()[0])
        except (OSError, ValueError):
            pass
        for i in (1, 2, 3):
            try:
                out["redis"].append(int((self.base / "redis" / f"n{SCALEOUT_PORTS['REDIS_PORT'] + i}" / "redis.pid").read_text().split()[0]))
            except (OSError, ValueError):
                pass
        return out

    def api(self, method, path, body=None, ok=(200, 201, 204)):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.http}{path}", data=data, method=method)
        req.add_header("authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")  # guest:guest
        req.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                text = resp.read()
                return resp.status, (json.loads(text) if text else None)
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return e.code, None
            raise Failure(f"RabbitMQ API {method} {path}: {e.code} {e.read()[:300]!r}")

    def purge(self, queue):
        """Empties `queue` if it exists (a run starts from an empty queue)."""
        self.api("DELETE", f"/api/queues/%2F/{queue}/contents", ok=(200, 201, 204, 404))

    def consumers(self, queue):
        """Consumers RabbitMQ lists on `queue` (from /api/consumers: events, not the 5 s stats)."""
        _, items = self.api("GET", "/api/consumers/%2F")
        return sum(1 for c in items or [] if c.get("queue", {}).get("name") == queue)

    def versions(self):
        rabbit = sorted(p.name.split("-", 1)[1] for p in Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*"))
        try:
            redis = re.search(r"v=(\S+)", subprocess.run(["redis-server", "--version"], capture_output=True,
                                                          text=True).stdout).group(1)
        except (OSError, AttributeError):
            redis = "?"
        return (rabbit[-1] if rabbit else "?"), redis


class ClusterFerrule(Ferrule):
    """One `ferrule serve` in cluster mode (the TOML of tests/cluster/conftest.py: RabbitMQ
    backend, registry on the Redis Cluster, every role), its own data dir, log level warn."""

    def __init__(self, suite, name, brokers, prefix):
        self.suite = suite
        self.name = name
        self.devices = 0
        self.passwords = True
        self.provisioned = False
        self.make_dirs(suite, name)
        off = limits_off(suite.supported_keys())
        mqtt_extra = (f"workers = {suite.args.mqtt_workers}\n" if suite.args.mqtt_workers else "") + off["mqtt"]
        self.config.write_text(CLUSTER_CONFIG.format(
            data_dir=self.data, app_password=APP_PASSWORD, amqp=brokers.amqp, http=brokers.http, instance=name,
            redis=json.dumps(brokers.redis), prefix=prefix, token=TOKEN, registry_extra=off["registry"],
            mqtt_extra=mqtt_extra,
            backend_extra=f"credit = {suite.args.backend_credit}" if suite.args.backend_credit else ""))
        self.proc = None


MOSQUITTO_CONFIG = """\
listener {port} 127.0.0.1
allow_anonymous {anonymous}
{password_file}
persistence false
user root
max_inflight_messages 1000
max_queued_messages 1000000
max_queued_bytes 0
max_keepalive 65535
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
"""


class Mosquitto:
    peer = True
    label = "Mosquitto"

    def __init__(self, suite, name, devices=0):
        self.suite = suite
        self.name = name
        self.dir = suite.workdir / f"mosquitto-{name}-{suite.next_id()}"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        pw = ""
        if devices:
            pwfile = self.dir / "passwords"
            pwfile.write_text("".join(f"dev{i}@{TENANT}:{DEVICE_PASSWORD}\n" for i in range(devices)))
            subprocess.run(["mosquitto_passwd", "-U", str(pwfile)], check=True, capture_output=True)
            pw = f"password_file {pwfile}"
        self.config = self.dir / "mosquitto.conf"
        self.config.write_text(MOSQUITTO_CONFIG.format(port=self.port, anonymous="false" if devices else "true", password_file=pw))
        self.proc = None

    def start(self):
        self.proc = Proc(self.suite, f"mosquitto-{self.name}", ["mosquitto", "-c", self.config])
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise Failure(f"mosquitto exited with {self.proc.returncode}: {self.proc.stderr_tail()}")
                if time.time() > deadline:
                    raise Failure("mosquitto did not listen within 20 s")
                time.sleep(0.05)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def addrs(self):
        return {"mqtt": f"127.0.0.1:{self.port}"}

    def dropped(self):
        return None

    def restart(self):
        self.proc.terminate()
        return self.start()

    def stop(self):
        if self.proc:
            self.proc.terminate()


class HelloServer:
    peer = True
    label = "bare hyper"

    def __init__(self, suite):
        self.suite = suite
        self.ready = suite.workdir / f"hello-{suite.next_id()}.ready"
        self.proc = None

    def start(self):
        self.proc = Proc(self.suite, "hello-server", [self.suite.loadgen_bin, "hello-server", "--listen", "127.0.0.1:0",
                                                     "--ready-file", self.ready], stdin=True)
        self.addr = wait_file(self.ready, self.proc, 20).strip()
        return self

    @property
    def pid(self):
        return self.proc.pid

    def addrs(self):
        return {"http": self.addr}

    def dropped(self):
        return None

    def stop(self):
        if self.proc:
            self.proc.terminate()


# ---------------------------------------------------------------------------------------
# the suite

PLACEHOLDERS = {"mqtt": "$MQTT", "amqp": "$AMQP", "http": "$HTTP", "coap": "$COAP", "ops": "$OPS"}


def median_min_max(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


class Suite:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.runs = args.runs or (1 if args.smoke else 3)
        self.scale = args.scale
        self._id = 0
        self.workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ferrule-bench-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.commands_log = open(self.workdir / "commands.log", "w", buffering=1)
        self.results = {}      # (scenario key, side) -> list of run dicts
        self.failures = []     # (scenario, message)
        self.notes = []
        self.server_errors = []
        self.examples = {}     # scenario key -> list of display command lines
        self.nofile = nofile_limit()
        profile = "debug" if args.smoke else "release"
        self.ferrule_bin = Path(args.ferrule_bin or ROOT / "target" / profile / "ferrule")
        self.loadgen_bin = Path(args.loadgen_bin or ROOT / "target" / profile / "ferrule-loadgen")
        self.have_mosquitto = shutil.which("mosquitto") is not None and shutil.which("mosquitto_passwd") is not None

    def next_id(self):
        self._id += 1
        return self._id

    def supported_keys(self):
        if not hasattr(self, "_keys"):
            self._keys = supported_keys(self.ferrule_bin)
        return self._keys

    def n(self, full, smoke):
        return smoke if self.smoke else max(1, int(full * self.scale))

    def count(self, key):
        return self.n(*COUNTS[key])

    # -- running loadgen processes ----------------------------------------------------

    def lg(self, name, args, stdin=False):
        return Proc(self, name, [self.loadgen_bin, *args], stdin=stdin)

    def timeout_for(self, count):
        return 60 + count / 1000

    def example(self, key, argvs):
        if key not in self.examples:
            self.examples[key] = argvs

    def measure(self, server, receiver, senders, key, count):
        """Starts the receiver (if any), waits for it, runs the senders to completion,
        then the receiver; returns (receiver result, sender results, cpu figures)."""
        recv = None
        ready = None
        if receiver is not None:
            ready = self.workdir / f"ready-{self.next_id()}"
            recv = self.lg("recv", receiver + ["--ready-file", ready])
            wait_file(ready, recv, 60)
        cpu0 = cpu_seconds(server.pid)
        procs = [self.lg(f"send{i}", s) for i, s in enumerate(senders)]
        results = []
        for p in procs:
            results.append(p.result(self.timeout_for(count)))
        r = recv.result(self.timeout_for(count)) if recv else None
        cpu1 = cpu_seconds(server.pid)
        active = max([x.get("seconds", 0) for x in results] + ([r.get("seconds", 0)] if r else []))
        active = max(active, 1e-3)
        lg_cpu = sum(x["_cpu"] for x in results) + (r["_cpu"] if r else 0)
        cpu = {"server_cpu_pct": 100 * (cpu1 - cpu0) / active, "lg_cpu_pct": 100 * lg_cpu / active, "active_s": active}
        if r:
            cpu["recv_cpu_pct"] = 100 * r["_cpu"] / active
        return r, results, cpu

    def record(self, key, side, run):
        self.results.setdefault((key, side), []).append(run)

    def check(self, key, ok, message):
        if not ok:
            self.failures.append((key, message))
            log(f"FAILED {key}: {message}")
        return ok

    # -- scenario helpers ---------------------------------------------------------------

    def recv_args(self, addrs, address, expect, credit=None):
        a = ["amqp-recv", "--amqp", addrs["amqp"], "--amqp-user", APP_USER, "--amqp-password", APP_PASSWORD,
             "--address", address, "--expect", str(expect), "--idle-timeout", "2" if self.smoke else "3"]
        return a + (["--credit", str(credit)] if credit else [])

    def sub_args(self, addrs, qos, expect):
        return ["mqtt-sub", "--host", addrs["mqtt"], "--filter", "telemetry", "--qos", str(qos), "--expect", str(expect),
                "--idle-timeout", "2" if self.smoke else "3", "--client-id", "lg-sub"]

    def pub_args(self, addrs, server, qos, count, topic="telemetry", rate=None, shape=None, gateway=False):
        connections, window = shape or (self.args.connections, self.args.window)
        if gateway:
            topic = f"telemetry/{TENANT}/gw{{i}}-d{{k}}"
        a = ["mqtt-pub", "--host", addrs["mqtt"], "--connections", str(connections), "--qos", str(qos),
             "--count", str(count), "--size", str(self.args.size), "--topic", topic, "--window", str(window),
             "--client-id", "lg-pub-{i}"]
        if gateway:
            a += ["--topic-devices", str(GATEWAY_DEVICES), "--username", "gw{i}@" + TENANT, "--password", DEVICE_PASSWORD,
                  "--devices", str(connections)]
        elif not server.peer:
            a += ["--username", "dev{i}@" + TENANT, "--password", DEVICE_PASSWORD, "--devices", str(connections)]
        if rate:
            a += ["--rate", f"{rate:.0f}"]
        return a

    def display(self, argv, addrs):
        text = " ".join(str(a) for a in argv)
        for k, v in addrs.items():
            text = text.replace(v, PLACEHOLDERS.get(k, v))
        return re.sub(r" --ready-file \S+", "", text)

    def mqtt_pair(self, key, server, qos, count, topic="telemetry", rate=None, warm=False, shape=None, credit=None,
                  gateway=False):
        """One run: publishers → server → AMQP application (Ferrule) or MQTT subscriber (peer).
        `shape`: (publisher connections, QoS 1 window) instead of the suite's; `credit`: the
        AMQP application's link credit (the MQTT subscriber has none)."""
        addrs = server.addrs()
        if server.peer:
            receiver = self.sub_args(addrs, qos, count)
        else:
            address = f"event/{TENANT}" if topic == "event" else f"telemetry/{TENANT}"
            receiver = self.recv_args(addrs, address, count, credit)
        sender = self.pub_args(addrs, server, qos, count, topic, rate, shape, gateway)
        if not warm:
            self.example(f"{key}/{server.label}", [self.display(["ferrule-loadgen"] + receiver, addrs),
                                                    self.display(["ferrule-loadgen"] + sender, addrs)])
        dropped0 = server.dropped()
        r, (p,), cpu = self.measure(server, receiver, [sender], key, count)
        dropped1 = server.dropped()
        run = {"rate": r["msgs_per_s"], "p50": r.get("p50_ms"), "p99": r.get("p99_ms"), "max": r.get("max_ms"),
               "lost": r.get("lost", 0), "received": r["msgs"], "sent": p["msgs"], "send_rate": p["msgs_per_s"],
               "puback_p50": p.get("puback_p50_ms"), "puback_p99": p.get("puback_p99_ms"), "errors": p["errors"] + r["errors"],
               **cpu}
        if dropped1 is not None and dropped0 is not None:
            run["server_dropped"] = dropped1 - dropped0
        if qos == 1:
            run["rate"] = p["msgs_per_s"]  # acknowledged publishes per second
        if not warm:
            self.check(key, p["errors"] == 0, f"{server.label}: publisher errors {p['errors']}: {p.get('first_error')}")
            if qos == 1:
                self.check(key, r.get("lost", 0) == 0, f"{server.label}: {r.get('lost')} of {count} QoS 1 messages not received")
                self.check(key, p.get("acked") == count, f"{server.label}: {p.get('acked')} of {count} PUBACKs")
            elif self.smoke:
                self.check(key, r["msgs"] >= count * 0.5, f"{server.label}: only {r['msgs']} of {count} received")
            else:
                self.check(key, r["msgs"] > 0, f"{server.label}: nothing received")
        return run

    # -- scenarios ----------------------------------------------------------------------

    def servers(self, make_ferrule, make_peer):
        out = [("ferrule", make_ferrule)]
        if make_peer and self.peer_enabled():
            out.append(("peer", make_peer))
        return out

    def peer_enabled(self):
        if self.args.no_peer:
            return False
        if not self.have_mosquitto:
            note = "Mosquitto is not installed: peer rows skipped."
            if note not in self.notes:
                self.notes.append(note)
                log(note)
            return False
        return True

    def with_server(self, server, fn):
        server.start()
        try:
            return fn(server)
        finally:
            server.stop()

    def series(self, key, side, count, run, describe):
        """A warm-up `run(n, warm=True)` of a tenth of `count` (at least 500), then the measured
        runs of `count`, each recorded under `key` and logged as `describe(number, run)`."""
        run(max(count // 10, 500), True)
        runs = []
        for i in range(self.runs):
            runs.append(run(count, False))
            self.record(key, side, runs[-1])
            log(describe(i + 1, runs[-1]))
        return runs

    def mqtt_servers(self, key):
        return self.servers(lambda: Ferrule(self, key, devices=self.args.connections), lambda: Mosquitto(self, key))

    def half_load(self, key, label, side, server, qos, runs, seconds, shape=None):
        """`self.runs` runs paced at half the median rate of the flat-out `runs`, each for
        `seconds` × scale (2 s in smoke mode), recorded under `key` with their target rate;
        the latency logged is the PUBACK's at QoS 1, end to end at QoS 0."""
        rate = statistics.median(run["rate"] for run in runs) / 2
        n = max(int(rate * (2 if self.smoke else max(2, seconds * self.scale))), 100)
        p50, p99 = ("puback_p50", "puback_p99") if qos else ("p50", "p99")
        for i in range(self.runs):
            run = self.mqtt_pair(key, server, qos, n, rate=rate, shape=shape)
            run["target_rate"] = rate
            self.record(key, side, run)
            log(f"{label} {server.label} run {i + 1}: {rate:.0f} msgs/s target, "
                f"{'PUBACK ' if qos else ''}p50 {run[p50]} p99 {run[p99]} ms")

    def scenario_qos0(self):
        count = self.count("qos0")
        for side, make in self.mqtt_servers("qos0"):
            def body(server):
                runs = self.series("qos0", side, count, lambda n, warm: self.mqtt_pair("qos0", server, 0, n, warm=warm),
                                   lambda i, run: f"qos0 {server.label} run {i}: {run['rate']:.0f} msgs/s p99 {run['p99']} ms "
                                                  f"lost {run['lost']}")
                # p99 at half load: half the median throughput.
                self.half_load("halfload", "half load", side, server, 0, runs, seconds=10)
            self.with_server(make(), body)

    def scenario_qos1(self):
        count = self.count("qos1")
        shape = QOS1_SHAPE if self.args.window == 16 and self.args.connections == 8 else None
        devices = (shape or (self.args.connections,))[0]
        make_ferrule = lambda: Ferrule(self, "qos1", devices=devices)  # noqa: E731
        for side, make in self.servers(make_ferrule, lambda: Mosquitto(self, "qos1")):
            def body(server):
                run = lambda n, warm: self.mqtt_pair("qos1", server, 1, n, warm=warm, shape=shape)  # noqa: E731
                runs = self.series("qos1", side, count, run,
                                   lambda i, run: f"qos1 {server.label} run {i}: {run['rate']:.0f} msgs/s p99 {run['p99']} ms")
                # PUBACK latency at half load: what acknowledging in batches costs when there
                # is room (the flat-out runs above only show what it saves).
                self.half_load("qos1half", "qos1 half load", side, server, 1, runs, seconds=5, shape=shape)
            self.with_server(make(), body)

    def scenario_gateway(self):
        """QoS 1 as in `qos1`, each publisher a gateway publishing for GATEWAY_DEVICES devices in
        turn (`telemetry/bench/gwN-dK`): the registry checks per publish are for the device and
        its gateway (`via`). Ferrule only: Mosquitto has no gateways."""
        count = self.count("gateway")
        shape = QOS1_SHAPE if self.args.window == 16 and self.args.connections == 8 else None
        gateways = (shape or (self.args.connections,))[0]

        def body(server):
            run = lambda n, warm: self.mqtt_pair("gateway", server, 1, n, warm=warm, shape=shape, gateway=True)  # noqa: E731
            self.series("gateway", "ferrule", count, run,
                        lambda i, run: f"gateway {server.label} run {i}: {run['rate']:.0f} msgs/s p99 {run['p99']} ms")
        self.with_server(Ferrule(self, "gateway", gateways=gateways), body)

    def scenario_events(self):
        count = self.count("events")

        def body(server):
            self.series("events", "ferrule", count,
                        lambda n, warm: self.mqtt_pair("events", server, 1, n, topic="event", warm=warm),
                        lambda i, run: f"events run {i}: {run['rate']:.0f} msgs/s PUBACK p99 {run['puback_p99']} ms, "
                                       f"end-to-end p99 {run['p99']} ms")
        self.with_server(Ferrule(self, "events", devices=self.args.connections), body)

    def http_run(self, key, server, count, warm=False):
        addrs = server.addrs()
        conns = str(self.args.http_connections)
        sender = ["http-pub", "--host", addrs["http"], "--connections", conns, "--count", str(count), "--size", str(self.args.size)]
        receiver = None
        if not server.peer:
            sender += ["--path", "/telemetry", "--basic", "dev{i}@" + TENANT + ":" + DEVICE_PASSWORD, "--devices", str(self.args.connections)]
            receiver = self.recv_args(addrs, f"telemetry/{TENANT}", count)
        if not warm:
            self.example(f"{key}/{server.label}", [self.display(["ferrule-loadgen"] + x, addrs) for x in (receiver, sender) if x])
        r, (p,), cpu = self.measure(server, receiver, [sender], key, count)
        run = {"rate": p["msgs_per_s"], "p50": p.get("p50_ms"), "p99": p.get("p99_ms"), "max": p.get("max_ms"),
               "errors": p["errors"], **cpu}
        if r:
            run["received"] = r["msgs"]
        if p.get("statuses"):
            run["statuses"] = p["statuses"]
        if not warm:
            # Ferrule answers 503 when the application cannot take more (QoS 0 included):
            # reported, and only a failure when it is most of the traffic (smoke: 10 %).
            bound = 0.1 if self.smoke else 0.5
            self.check(key, p["errors"] <= count * bound and not p.get("first_error"),
                       f"{server.label}: {p['errors']} of {count} HTTP requests failed {p.get('statuses')} {p.get('first_error')}")
            if r:
                self.check(key, r["msgs"] == p["msgs"], f"{server.label}: {r['msgs']} received of {p['msgs']} uploads answered 2xx")
        return run

    def scenario_http(self):
        count = self.count("http")
        makers = [("ferrule", lambda: Ferrule(self, "http", devices=self.args.connections))]
        if not self.args.no_peer:
            makers.append(("peer", lambda: HelloServer(self)))
        for side, make in makers:
            def body(server):
                self.series("http", side, count, lambda n, warm: self.http_run("http", server, n, warm=warm),
                            lambda i, run: f"http {server.label} run {i}: {run['rate']:.0f} req/s p99 {run['p99']} ms")
            self.with_server(make(), body)

    def coap_run(self, key, server, kind, count, warm=False):
        addrs = server.addrs()
        sender = ["coap-pub", "--host", addrs["coap"], "--type", kind, "--clients", str(self.args.connections),
                  "--devices", str(self.args.connections), "--window", "8", "--count", str(count), "--size", str(self.args.size),
                  "--path", f"/telemetry/{TENANT}/dev{{i}}"]
        receiver = self.recv_args(addrs, f"telemetry/{TENANT}", count)
        if not warm:
            self.example(f"{key}/{server.label}", [self.display(["ferrule-loadgen"] + x, addrs) for x in (receiver, sender)])
        dropped0 = server.dropped()
        r, (p,), cpu = self.measure(server, receiver, [sender], key, count)
        dropped1 = server.dropped()
        run = {"rate": r["msgs_per_s"] if kind == "non" else p["msgs_per_s"], "ack_rate": p["msgs_per_s"],
               "p50": p.get("p50_ms"), "p99": p.get("p99_ms"), "e2e_p99": r.get("p99_ms"), "received": r["msgs"],
               "lost": r.get("lost", 0), "errors": p["errors"], "codes": p.get("codes"), **cpu}
        if dropped0 is not None and dropped1 is not None:
            run["server_dropped"] = dropped1 - dropped0
        if not warm:
            self.check(key, p["errors"] == 0 or kind == "non", f"CoAP {kind}: errors {p['errors']} {p.get('codes')} timeouts {p.get('timeouts')}")
            if kind == "con":
                self.check(key, r["msgs"] == count, f"CoAP CON: {r['msgs']} of {count} received")
            else:
                self.check(key, r["msgs"] >= count * (0.5 if self.smoke else 0.01), f"CoAP NON: {r['msgs']} of {count} received")
        return run

    def scenario_coap(self):
        count = self.count("coap")

        def body(server):
            for kind in ("non", "con"):
                key = f"coap-{kind}"
                self.series(key, "ferrule", count, lambda n, warm: self.coap_run(key, server, kind, n, warm=warm),
                            lambda i, run: f"CoAP {kind.upper()} run {i}: {run['rate']:.0f} msgs/s "
                                           f"(responses {run['ack_rate']:.0f}/s), lost {run['lost']}")
        self.with_server(Ferrule(self, "coap", devices=self.args.connections, passwords=False), body)

    def idle_run(self, make, label, n):
        server = make().start()
        gens = []
        try:
            addrs = server.addrs()
            # Warm-up: a few connections opened and closed, so that one-time allocations
            # are not charged to the idle connections.
            warm = self.lg("idle-warm", ["idle", "--host", addrs["mqtt"], "--connections", "100", "--client-id", "warm-{i}"], stdin=True)
            warm.first_line(60)
            warm.terminate()
            time.sleep(1.0)
            before = rss_bytes(server.pid)
            per_gen = max(1, self.nofile - 500)
            start = time.time()
            left, k = n, 0
            while left > 0:
                m = min(left, per_gen)
                argv = ["idle", "--host", addrs["mqtt"], "--connections", str(m), "--keepalive", "600",
                        "--sources", IDLE_SOURCES, "--client-id", f"idle{k}-{{i}}"]
                self.example(f"idle/{label}", [self.display(["ferrule-loadgen"] + argv, addrs)])
                gens.append(self.lg(f"idle{k}", argv, stdin=True))
                left -= m
                k += 1
            lines = [g.first_line(120 + n / 500) for g in gens]
            connect_s = time.time() - start
            connected = sum(x["connections"] for x in lines)
            failed = sum(x["failed"] for x in lines)
            time.sleep(2.0)
            after = rss_bytes(server.pid)
            # Closing stdin ends the generators; each reports on stderr how many of its
            # connections the server dropped while they were held.
            dropped = 0
            for g in gens:
                g.terminate()
                for line in g.stderr_tail(100000).splitlines():
                    if line.startswith("{") and '"idle-end"' in line:
                        dropped += json.loads(line).get("dropped", 0)
            run = {"connections": connected, "failed": failed, "rss_before": before, "rss_after": after,
                   "bytes_per_conn": (after - before) / max(connected, 1), "connect_s": connect_s,
                   "connects_per_s": connected / max(connect_s, 1e-3), "dropped": dropped}
            self.check("idle", dropped == 0, f"{label} idle {n}: the server dropped {dropped} held connections")
            errors = [x.get("first_error") for x in lines if x.get("first_error")]
            self.check("idle", failed == 0, f"{label} idle {n}: {failed} connections failed ({errors[:1]})")
            return run
        finally:
            for g in gens:
                g.terminate()
            server.stop()

    def scenario_idle(self):
        cap = max(100, self.nofile - 1000)
        sizes = [200] if self.smoke else [int(s) for s in self.args.idle_sizes.split(",")]
        done = set()
        for size in sizes:
            n = min(size, cap)
            if n in done:
                continue
            done.add(n)
            if n < size:
                note = (f"idle {size}: capped at {n} connections: RLIMIT_NOFILE hard limit {self.nofile} "
                        "(raising it needs CAP_SYS_RESOURCE, which this machine does not grant)")
                self.notes.append(note)
                log(note)
            key = f"idle-{n}"
            self.idle_sizes_run = getattr(self, "idle_sizes_run", []) + [(size, n)]
            for side, make in self.servers(lambda: Ferrule(self, "idle"), lambda: Mosquitto(self, "idle")):
                for i in range(self.runs):
                    run = self.idle_run(make, "Ferrule" if side == "ferrule" else "Mosquitto", n)
                    self.record(key, side, run)
                    log(f"idle {n} {side} run {i + 1}: {run['bytes_per_conn']:.0f} B/conn, {run['connects_per_s']:.0f} connects/s")

    def scenario_storm(self):
        devices = self.count("storm-devices")
        seconds = 1.5 if self.smoke else max(2.0, 10 * self.scale)
        workers = 8 if self.smoke else 32
        for side, make in self.servers(lambda: Ferrule(self, "storm", devices=devices),
                                       lambda: Mosquitto(self, "storm", devices=devices)):
            def body(server):
                addrs = server.addrs()
                for i in range(self.runs):
                    argv = ["connect-storm", "--host", addrs["mqtt"], "--workers", str(workers), "--devices", str(devices),
                            "--username", "dev{i}@" + TENANT, "--password", DEVICE_PASSWORD, "--duration", str(seconds),
                            "--sources", STORM_SOURCES, "--client-id", f"storm{i}-{{i}}"]
                    if i == 0:
                        argv.append("--warm")
                    self.example(f"storm/{server.label}", [self.display(["ferrule-loadgen"] + argv, addrs)])
                    _, (p,), cpu = self.measure(server, None, [argv], "storm", 10_000)
                    run = {"rate": p["connects_per_s"], "p50": p.get("connack_p50_ms"), "p99": p.get("connack_p99_ms"),
                           "errors": p["errors"], "failures": p.get("failures"), **cpu}
                    if "cold_connects_per_s" in p:
                        run["cold_rate"] = p["cold_connects_per_s"]
                        run["cold_seconds"] = p["cold_seconds"]
                        self.check("storm", p.get("cold_failed", 0) == 0, f"{server.label}: cold connects failed: {p.get('cold_failures')}")
                    self.check("storm", p["errors"] == 0 and p["msgs"] > 0, f"{server.label}: {p['errors']} failed connects: {p.get('failures')}")
                    self.record("storm", side, run)
                    log(f"storm {server.label} run {i + 1}: {run['rate']:.0f} CONNECT/s" +
                        (f" (cold: {run['cold_rate']:.0f}/s)" if "cold_rate" in run else ""))
            self.with_server(make(), body)

    def scenario_restart(self):
        """Issue 16: a restart storm. Every device connected once before (Ferrule: verified
        with argon2id, remembered as a password verifier under `verifier_key_file`); then the
        server restarts and every device connects again at once, each once: CONNECT/s of
        that pass, from a fresh process each run. Mosquitto reads its password_file
        (PBKDF2-SHA512) at start."""
        devices = self.count("restart-devices")
        workers = 8 if self.smoke else 32
        for side, make in self.servers(lambda: Ferrule(self, "restart", devices=devices, verifier_key=True),
                                       lambda: Mosquitto(self, "restart", devices=devices)):
            def body(server):
                def storm(tag):
                    argv = ["connect-storm", "--host", server.addrs()["mqtt"], "--workers", str(workers), "--devices", str(devices),
                            "--username", "dev{i}@" + TENANT, "--password", DEVICE_PASSWORD, "--warm", "--count", "0",
                            "--sources", STORM_SOURCES, "--client-id", f"restart{tag}-{{i}}"]
                    _, (p,), cpu = self.measure(server, None, [argv], "restart", devices * 20)
                    self.check("restart", p.get("cold_failed", 0) == 0 and p.get("cold_connects") == devices,
                               f"{server.label}: {p.get('cold_connects')} of {devices} connected: {p.get('cold_failures')}")
                    return argv, p, cpu
                _, first, _ = storm("first")
                log(f"restart {server.label}: first connect of {devices} devices: {first['cold_connects_per_s']:.0f}/s")
                for i in range(self.runs):
                    server.restart()
                    argv, p, cpu = storm(i)
                    self.example(f"restart/{server.label}", [self.display(["ferrule-loadgen"] + argv, server.addrs())])
                    run = {"rate": p["cold_connects_per_s"], "seconds": p["cold_seconds"], "first_rate": first["cold_connects_per_s"], **cpu}
                    self.record("restart", side, run)
                    log(f"restart {server.label} run {i + 1}: {run['rate']:.0f} CONNECT/s ({devices} devices in {run['seconds']:.1f} s)")
            self.with_server(make(), body)

    def scenario_commands(self):
        count = self.count("commands")
        devices = min(10, self.args.connections)

        def body(server):
            addrs = server.addrs()
            for i in range(self.runs + 1):
                n = max(count // 10, 200) if i == 0 else count
                argv = ["commands", "--amqp", addrs["amqp"], "--amqp-user", APP_USER, "--amqp-password", APP_PASSWORD,
                        "--host", addrs["mqtt"], "--username", "dev{i}@" + TENANT, "--password", DEVICE_PASSWORD,
                        "--devices", str(devices), "--device-count", str(devices), "--window", "32", "--count", str(n),
                        "--client-id", f"cmd{i}-{{i}}"]
                if i > 0:
                    self.example("commands/Ferrule", [self.display(["ferrule-loadgen"] + argv, addrs)])
                _, (p,), cpu = self.measure(server, None, [argv], "commands", n)
                if i == 0:
                    continue
                run = {"rate": p["msgs_per_s"], "p50": p.get("p50_ms"), "p99": p.get("p99_ms"), "max": p.get("max_ms"),
                       "errors": p["errors"], **cpu}
                self.check("commands", p["errors"] == 0 and p["msgs"] == n,
                           f"{p['msgs']} of {n} round trips, {p['errors']} errors: {p.get('first_error')}")
                self.record("commands", "ferrule", run)
                log(f"commands run {i}: {run['rate']:.0f}/s p99 {run['p99']} ms")
        self.with_server(Ferrule(self, "commands", devices=devices), body)

    def scenario_flow(self):
        """Issue 18: bursts the application can absorb, from many devices with deep windows
        and from many devices with one message each, QoS 0 and 1, application credit 1000
        and 100. No device may lose its connection; QoS 1 loses nothing."""
        count = self.count("flow")
        shapes = FLOW_SHAPES[:1] if self.smoke else FLOW_SHAPES
        credits = FLOW_CREDITS[1:] if self.smoke else FLOW_CREDITS
        devices = max(c for _, c, _ in shapes)
        make_peer = lambda: Mosquitto(self, "flow")  # noqa: E731
        for side, make in self.servers(lambda: Ferrule(self, "flow", devices=devices), make_peer):
            def body(server):
                for label, connections, window in shapes:
                    for qos in (1, 0):
                        # The peer's subscriber has no credit: one series per shape and QoS.
                        for credit in (credits if side == "ferrule" else [None]):
                            key = f"flow-{label}-qos{qos}" + (f"-credit{credit}" if credit else "")
                            run = lambda n, warm: self.mqtt_pair(  # noqa: E731
                                key, server, qos, n, warm=warm, shape=(connections, window), credit=credit)
                            self.series(key, side, count, run,
                                        lambda i, r: f"{key} {server.label} run {i}: {r['rate']:.0f} msgs/s "
                                                     f"received {r['received']}/{r['sent']} errors {r['errors']}")
            self.with_server(make(), body)

    def scenario_peer(self):
        """Mosquitto alone with more publishers and deeper windows: where its figure stops
        rising (the peer runs of the other scenarios must not under-drive it)."""
        if not self.peer_enabled():
            return
        count = self.count("peer")
        def body(server):
            for qos, shapes in PEER_SWEEP.items():
                for connections, window in (shapes[:2] if self.smoke else shapes):
                    key = f"peer-qos{qos}-{connections}x{window}"
                    for i in range(self.runs):
                        run = self.mqtt_pair(key, server, qos, count, shape=(connections, window))
                        self.record(key, "peer", run)
                        log(f"{key} run {i + 1}: {run['rate']:.0f} msgs/s received {run['received']}/{run['sent']}")
        self.with_server(Mosquitto(self, "peer"), body)

    def scenario_overload(self):
        """Issue 18: an application that accepts half of what the devices send (10 QoS 1
        devices, window 100) for 30 s: devices are slowed first (PUBACK latency rises while
        messages are held for the application), refused only past the hold bounds
        (`consumer_wait`, `consumer_wait_bytes`); RSS stays bounded."""
        seconds = 4 if self.smoke else max(10, int(30 * self.scale))
        send_rate = 500 if self.smoke else 4000
        # The application accepts half the rate (the devices' windows bound what waits: they
        # are slowed), or so little that a message waits longer than `consumer_wait`.
        variants = [("overload-half", send_rate // 2)] + ([] if self.smoke else [("overload-far", 100)])
        def body(server):
            for key, app_rate in variants:
                one(server, key, app_rate)
        def one(server, key, app_rate):
            addrs = server.addrs()
            receiver = self.recv_args(addrs, f"telemetry/{TENANT}", 0, credit=100) + ["--rate", str(app_rate)]
            sender = ["mqtt-pub", "--host", addrs["mqtt"], "--connections", "10", "--qos", "1", "--window", "100",
                      "--duration", str(seconds), "--rate", str(send_rate), "--size", str(self.args.size),
                      "--client-id", "lg-pub-{i}", "--username", "dev{i}@" + TENANT, "--password", DEVICE_PASSWORD,
                      "--devices", "10", "--drain-timeout", "10"]
            self.example(key, [self.display(["ferrule-loadgen"] + receiver, addrs),
                                      self.display(["ferrule-loadgen"] + sender, addrs)])
            for i in range(self.runs):
                samples, done = [], threading.Event()
                def sample():
                    while not done.is_set():
                        samples.append(rss_bytes(server.pid))
                        done.wait(0.5)
                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                labels = f'address="telemetry/{TENANT}"'
                held0 = server.metric("ferrule_direct_held_total", labels) or 0
                expired0 = server.metric("ferrule_direct_held_expired_total", labels) or 0
                r, (p,), cpu = self.measure(server, receiver, [sender], key, send_rate * seconds)
                done.set()
                sampler.join()
                run = {"sent": p["msgs"], "acked": p.get("acked", 0), "errors": p["errors"],
                       "first_error": p.get("first_error"), "puback_p50": p.get("puback_p50_ms"),
                       "puback_p99": p.get("puback_p99_ms"), "puback_max": p.get("puback_max_ms"),
                       "received": r["msgs"], "rss_start": samples[0] if samples else None,
                       "rss_max": max(samples) if samples else None,
                       "held": (server.metric("ferrule_direct_held_total", labels) or 0) - held0,
                       "held_expired": (server.metric("ferrule_direct_held_expired_total", labels) or 0) - expired0,
                       "app_rate": app_rate, **cpu}
                self.record(key, "ferrule", run)
                self.check(key, run["held"] > 0, "nothing was held for the slow application")
                log(f"{key} run {i + 1}: sent {run['sent']} acked {run['acked']} received {run['received']} "
                    f"PUBACK p50 {run['puback_p50']} p99 {run['puback_p99']} ms, device errors {run['errors']} "
                    f"({run['first_error']}), held {run['held']:.0f} expired {run['held_expired']:.0f}, "
                    f"RSS {run['rss_start']} -> max {run['rss_max']}")
        self.with_server(Ferrule(self, "overload", devices=10), body)

    def scenario_isolation(self):
        """Issue 17: tenant B's end-to-end latency alone (baseline) and while tenant A runs
        into every limit it has at once (hostile); A's refusals by kind; Ferrule's RSS."""
        probe = subprocess.run([sys.executable, "-c", "import proton"], capture_output=True, text=True)
        if probe.returncode != 0:
            raise Failure(f"{sys.executable} cannot import proton (python-qpid-proton, tests/requirements.txt): "
                          "the hostile tenant's AMQP application needs it")
        seconds = self.n(*ISO["seconds"])
        seconds = max(5, seconds) if not self.smoke else seconds

        def body(server):
            self.iso_phase(server, "iso-warm", False, 2, warm=True)  # B's devices verified once (argon2)
            for i in range(self.runs):
                base = self.iso_phase(server, "iso-baseline", False, seconds)
                self.record("iso-baseline", "ferrule", base)
                log(f"isolation run {i + 1} baseline: B p50 {base['p50']} p99 {base['p99']} ms, "
                    f"received {base['received']}/{base['sent']}, RSS max {base['rss_max']}")
                hostile = self.iso_phase(server, "iso-hostile", True, seconds)
                hostile["p99_ratio"] = hostile["p99"] / base["p99"] if hostile.get("p99") and base.get("p99") else None
                # A is gone: B's devices can still connect and send (a second's worth).
                after = self.iso_phase(server, "iso-after", False, 1, warm=True)
                hostile["after_received"] = f"{after['received']}/{after['sent']}"
                self.check("iso-hostile", after["lost"] == 0 and after["errors"] == 0 and after["received"] > 0,
                           f"tenant B after the hostile phase: {after['received']} received of {after['sent']} sent, "
                           f"errors {after['errors']} ({after['first_error']})")
                self.record("iso-hostile", "ferrule", hostile)
                a = hostile["a"]["mqtt"]
                log(f"isolation run {i + 1} hostile: B p50 {hostile['p50']} p99 {hostile['p99']} ms "
                    f"(p99 {hostile['p99_ratio'] or 0:.2f}x baseline), received {hostile['received']}/{hostile['sent']}, "
                    f"RSS max {hostile['rss_max']}; A CONNACK {a['connack']} PUBACK {a['puback']} "
                    f"receivers {json.dumps(hostile['a'].get('amqp', {}).get('receivers', {}))}")
        self.with_server(IsolationFerrule(self, "isolation"), body)

    def iso_phase(self, server, key, hostile, seconds, warm=False):
        """One phase: tenant B's devices send `b_rate` msgs/s at QoS 1 for `seconds` to B's
        application (ferrule-loadgen mqtt-pub / amqp-recv, as the other scenarios); with
        `hostile`, tenant A (hostile_tenant.py, plus an amqp-recv consuming A's telemetry)
        attacks from just before B starts until B is done. Ferrule's RSS is sampled
        every 0.2 s throughout."""
        addrs = server.addrs()
        count = max(int(ISO["b_rate"] * seconds), 10)
        nb = ISO["b_devices"]
        receiver = ["amqp-recv", "--amqp", addrs["amqp"], "--amqp-user", f"app@{ISO_B}", "--amqp-password", APP_PASSWORD,
                    "--address", f"telemetry/{ISO_B}", "--expect", str(count), "--idle-timeout", "5"]
        sender = ["mqtt-pub", "--host", addrs["mqtt"], "--connections", str(nb), "--devices", str(nb), "--qos", "1",
                  "--window", "16", "--count", str(count), "--rate", str(ISO["b_rate"]), "--size", str(self.args.size),
                  "--username", "dev{i}@" + ISO_B, "--password", DEVICE_PASSWORD, "--client-id", "iso-b-{i}"]
        a_recv_argv = ["amqp-recv", "--amqp", addrs["amqp"], "--amqp-user", f"app@{ISO_A}", "--amqp-password", APP_PASSWORD,
                       "--address", f"telemetry/{ISO_A}", "--expect", "0", "--idle-timeout", "3600", "--start-timeout", "3600"]
        helper_argv = [sys.executable, HOSTILE_TENANT, "--mqtt", addrs["mqtt"], "--amqp", addrs["amqp"], "--tenant", ISO_A,
                       "--password", DEVICE_PASSWORD, "--connections", ISO["a_connections"], "--rate", ISO["a_rate"],
                       "--app-user", f"app@{ISO_A}", "--app-password", APP_PASSWORD, "--big-mib", ISO["big_mib"],
                       "--depth", ISO["depth"], "--receivers", self.n(*ISO["receivers"]), "--duration", seconds + 60]
        if self.args.attacker_nice:
            # The attacker's CPU is not the platform's: at a lower priority it takes what
            # Ferrule and tenant B leave (on a real deployment it runs elsewhere).
            helper_argv = ["nice", "-n", str(self.args.attacker_nice)] + helper_argv
        if not warm:
            argvs = [self.display(["ferrule-loadgen"] + receiver, addrs), self.display(["ferrule-loadgen"] + sender, addrs)]
            if hostile:
                argvs = [self.display(["ferrule-loadgen"] + a_recv_argv, addrs),
                         self.display(["python3", "tests/loadgen/hostile_tenant.py"] + helper_argv[2:], addrs)] + argvs
            self.example(key, argvs)
        samples, done = [], threading.Event()

        def sample():
            while not done.is_set():
                try:
                    samples.append(rss_bytes(server.pid))
                except OSError:
                    pass
                done.wait(0.2)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        a_recv = helper = None
        counters0 = server.counters() if hostile else {}
        t_ready = time.time()
        try:
            if hostile:
                ready = self.workdir / f"ready-{self.next_id()}"
                a_recv = self.lg("a-recv", a_recv_argv + ["--ready-file", ready])
                wait_file(ready, a_recv, 60)
                ready = self.workdir / f"hostile-ready-{self.next_id()}"
                helper = Proc(self, "hostile-a", helper_argv + ["--ready-file", ready])
                wait_file(ready, helper, 60)
                t_ready = time.time()
            b_start = time.time()
            r, (p,), cpu = self.measure(server, receiver, [sender], key, count)
            b_end = time.time()
            cpu_server = cpu["server_cpu_pct"]
        finally:
            if helper:
                helper.terminate(30)
            if a_recv:
                a_recv.kill()
            done.set()
            sampler.join()
        run = {"p50": r.get("p50_ms"), "p99": r.get("p99_ms"), "max": r.get("max_ms"), "received": r["msgs"],
               "sent": p["msgs"], "acked": p.get("acked", 0), "lost": r.get("lost", 0), "errors": p["errors"] + r["errors"],
               "first_error": p.get("first_error") or r.get("first_error"), "puback_p50": p.get("puback_p50_ms"),
               "puback_p99": p.get("puback_p99_ms"), "rate": p["msgs_per_s"], "server_cpu_pct": cpu_server,
               "lg_cpu_pct": cpu["lg_cpu_pct"], "rss_start": samples[0] if samples else None,
               "rss_max": max(samples) if samples else None, "b_seconds": round(b_end - b_start, 2)}
        if warm:
            return run
        self.check(key, server.proc.poll() is None, f"Ferrule exited ({server.proc.returncode}): {server.proc.stderr_tail(500)}")
        self.check(key, run["lost"] == 0 and run["errors"] == 0,
                   f"tenant B: {run['received']} of {count} received, {run['acked']} acknowledged, errors {run['errors']} "
                   f"({run['first_error']})")
        if hostile:
            lines = helper.json_lines()
            if not lines:
                raise Failure(f"hostile_tenant.py printed no result (exit {helper.returncode}): {helper.stderr_tail()}")
            a = lines[-1]
            run["a"] = a
            run["a_cpu_pct"] = 100 * (helper.cpu or 0) / max(b_end - t_ready, 1e-3)
            # Times in the helper's result are seconds since it was ready; B sent from
            # b_start - t_ready on.
            run["b_window"] = (round(b_start - t_ready, 2), round(b_end - t_ready, 2))
            counters1 = server.counters()
            run["counters"] = {k: v - counters0.get(k, 0) for k, v in counters1.items() if v - counters0.get(k, 0) > 0}
            b_refused = {k: v for k, v in run["counters"].items() if f'tenant="{ISO_B}"' in k}
            self.check(key, not b_refused, f"tenant B was refused: {b_refused}")
            mq = a.get("mqtt", {})
            self.check(key, sum(v for c, v in mq.get("connack", {}).items() if c != "0x00") > 0,
                       f"tenant A's connections beyond max-connections were not refused: CONNACK {mq.get('connack')}")
            self.check(key, mq.get("puback", {}).get("0x97", 0) > 0,
                       f"tenant A's telemetry over the tenant rate was not refused: PUBACK {mq.get('puback')}")
            amqp = a.get("amqp", {})
            for attack in ("big_message", "nested_body"):
                self.check(key, amqp.get(attack, {}).get("refused"), f"tenant A's {attack}: {amqp.get(attack)}")
        return run

    def scenario_scaleout(self):
        """Issue 14: events and QoS 1 telemetry through 1, 2 and 3 Ferrule instances in cluster mode
        (RabbitMQ + Redis Cluster), devices spread evenly, the application on the first instance;
        next to the broker's own ceiling (plain AMQP 1.0 producer and consumer, same payload, same
        queue kinds) measured in the same run. Opt-in; never in smoke mode."""
        if self.smoke:
            self.notes.append("scaleout: not run in smoke mode (it starts RabbitMQ and a Redis Cluster)")
            return
        missing = [c for c in ("redis-server", "redis-cli", "epmd") if shutil.which(c) is None]
        if not Path("/usr/lib/rabbitmq").exists():
            missing.append("rabbitmq-server")
        if missing:
            raise Failure(f"missing {missing}: apt-get install rabbitmq-server redis-server (tests/run-tests.sh does)")
        count = self.n(*SCALEOUT["count"])
        brokers = ClusterBrokers(self)
        self.scaleout_info = {"count": count, "versions": brokers.versions()}
        try:
            brokers.start()
            brokers.api("PUT", "/api/policies/%2F/ferrule-telemetry", TELEMETRY_POLICY)
            self.scaleout_ceiling(brokers, count)
            prefix = f"ferrule-bench-{os.urandom(4).hex()}"
            provisioned = False
            for n in SCALEOUT["instances"]:
                instances = [ClusterFerrule(self, f"so{n}-i{k + 1}", brokers, prefix) for k in range(n)]
                try:
                    t0 = time.time()
                    for inst in instances:
                        inst.start()
                    if not provisioned:
                        instances[0].provision(SCALEOUT["devices"])
                        provisioned = True
                    log(f"scaleout: {n} instance(s) up in {time.time() - t0:.1f} s")
                    for kind in ("event", "telemetry"):
                        key = f"so-{kind}-{n}"
                        self.series(key, "ferrule", count,
                                    lambda c, warm: self.scaleout_run(key, brokers, instances, kind, c, warm),
                                    lambda i, r: f"{key} run {i}: {r['rate']:.0f} msgs/s received ({r['received']}/{r['sent']}, "
                                                 f"acked {r['acked']}), e2e p99 {r['p99']} ms, PUBACK p99 {r['puback_p99']} ms; "
                                                 f"CPU beam {r['beam_cpu_pct']:.0f} % ferrule {r['ferrule_cpu_pct']:.0f} % "
                                                 f"redis {r['redis_cpu_pct']:.0f} % loadgen {r['lg_cpu_pct']:.0f} %")
                    for inst in instances:
                        self.check(f"so-{n}", inst.proc.poll() is None,
                                   f"{inst.name} exited ({inst.proc.returncode}): {inst.proc.stderr_tail(500)}")
                finally:
                    for inst in instances:
                        inst.stop()
        finally:
            brokers.stop()

    def scaleout_ceiling(self, brokers, count):
        """The broker alone: one `amqp-send` (unsettled, window = the devices' total QoS 1 window)
        and one `amqp-recv` straight at RabbitMQ, as guest. Events: a quorum queue made through
        the management API (as Ferrule does), durable messages. Telemetry: `/queue/telemetry.ceiling`
        declared by the consumer under the telemetry policy, non-durable messages to
        `/amq/queue/telemetry.ceiling`, as Ferrule's bridges and forwarders do."""
        brokers.api("PUT", "/api/queues/%2F/event.ceiling", {"durable": True, "arguments": {"x-queue-type": "quorum"}})
        window = SCALEOUT["devices"] * SCALEOUT["window"]
        for kind in ("event", "telemetry"):
            key = f"so-{kind}-ceiling"
            queue = f"{kind}.ceiling"
            source = f"/amq/queue/{queue}" if kind == "event" else f"/queue/{queue}"

            def run(n, warm, kind=kind, key=key, queue=queue, source=source):
                brokers.purge(queue)
                amqp = ["--amqp", brokers.amqp, "--amqp-user", "guest", "--amqp-password", "guest"]
                receiver = ["amqp-recv", *amqp, "--address", source, "--expect", str(n), "--idle-timeout", "5",
                            "--start-timeout", "30", "--credit", str(SCALEOUT["credit"])]
                sender = ["amqp-send", *amqp, "--address", f"/amq/queue/{queue}", "--count", str(n), "--size",
                          str(self.args.size), "--window", str(window)] + (["--durable"] if kind == "event" else [])
                if not warm:
                    self.example(key, [" ".join(["ferrule-loadgen", *receiver]), " ".join(["ferrule-loadgen", *sender])])
                return self.scaleout_measure(key, brokers, [], receiver, sender, n, warm, lambda: None)

            self.series(key, "broker", count, run,
                        lambda i, r, key=key: f"{key} run {i}: {r['rate']:.0f} msgs/s received ({r['received']}/{r['sent']}), "
                                              f"producer {r['send_rate']:.0f}/s, outcome p99 {r['puback_p99']} ms; CPU beam "
                                              f"{r['beam_cpu_pct']:.0f} % loadgen {r['lg_cpu_pct']:.0f} %")

    def scaleout_run(self, key, brokers, instances, kind, count, warm):
        """One run through Ferrule: `amqp-recv` on `kind/bench` at the first instance, one `mqtt-pub`
        (QoS 1, devices dev0.. spread over every instance's MQTT listener)."""
        queue = f"{kind}.{TENANT}"
        brokers.purge(queue)
        app = instances[0]
        receiver = ["amqp-recv", "--amqp", app.listeners["amqp"], "--amqp-user", APP_USER, "--amqp-password", APP_PASSWORD,
                    "--address", f"{kind}/{TENANT}", "--expect", str(count), "--idle-timeout", "5", "--start-timeout", "30",
                    "--credit", str(SCALEOUT["credit"])]
        devices = SCALEOUT["devices"]
        hosts = ",".join(i.listeners["mqtt"] for i in instances)
        sender = ["mqtt-pub", "--host", hosts, "--connections", str(devices), "--devices", str(devices), "--qos", "1",
                  "--count", str(count), "--size", str(self.args.size), "--topic", kind, "--window", str(SCALEOUT["window"]),
                  "--client-id", "so-{i}", "--username", "dev{i}@" + TENANT, "--password", DEVICE_PASSWORD]
        if not warm:
            names = {i.listeners["mqtt"]: f"$MQTT{k + 1}" for k, i in enumerate(instances)}
            names[app.listeners["amqp"]] = "$AMQP1"
            disp = lambda argv: re.sub(r"\S+:\d+", lambda m: ",".join(names.get(h, h) for h in m.group(0).split(",")),  # noqa: E731
                                       " ".join(["ferrule-loadgen", *argv]))
            self.example(f"{key.rsplit('-', 1)[0]}-N", [disp(receiver), disp(sender)])

        def consumer_ready():
            # The application's link at the instance is attached (ready file); its bridge
            # attaches at RabbitMQ and writes the consumer lease (Redis) asynchronously.
            deadline = time.time() + 30
            while brokers.consumers(queue) < 1:
                if time.time() > deadline:
                    raise Failure(f"{key}: no consumer on RabbitMQ queue {queue} 30 s after the application attached")
                time.sleep(0.1)
            time.sleep(0.7)  # the other instances cache a lease answer for 500 ms
        return self.scaleout_measure(key, brokers, instances, receiver, sender, count, warm, consumer_ready)

    def scaleout_measure(self, key, brokers, instances, receiver, sender, count, warm, ready_hook):
        """Receiver first (ready), `ready_hook()`, then the sender; CPU of beam.smp, the Redis
        nodes and each Ferrule instance from /proc over the run, divided by the active interval
        (first send to last message received), as `measure` does."""
        ready = self.workdir / f"ready-{self.next_id()}"
        recv = self.lg("so-recv", receiver + ["--ready-file", ready])
        wait_file(ready, recv, 60)
        ready_hook()
        pids = brokers.pids()
        watched = {"beam": [pids.get("beam.smp")] if pids.get("beam.smp") else [], "redis": pids["redis"]}
        for k, inst in enumerate(instances):
            watched[f"ferrule{k + 1}"] = [inst.pid]
        cpu0 = {k: sum(cpu_seconds(p) for p in v) for k, v in watched.items()}
        t0 = time.time()
        send = self.lg("so-send", sender)
        p = send.result(self.timeout_for(count))
        r = recv.result(self.timeout_for(count))
        wall = time.time() - t0
        cpu1 = {k: sum(cpu_seconds(p_) for p_ in v) for k, v in watched.items()}
        active = max(p.get("seconds", 0), r.get("seconds", 0), 1e-3)
        pct = {k: 100 * (cpu1[k] - cpu0[k]) / active for k in watched}
        acked = p.get("acked", p["msgs"]) if sender[0] == "mqtt-pub" else p["msgs"]
        run = {"rate": r["msgs_per_s"], "received": r["msgs"], "lost": r.get("lost", 0), "sent": p.get("sent", p["msgs"]),
               "acked": acked, "send_rate": p["msgs_per_s"], "p50": r.get("p50_ms"), "p99": r.get("p99_ms"),
               "puback_p50": p.get("puback_p50_ms", p.get("outcome_p50_ms")),
               "puback_p99": p.get("puback_p99_ms", p.get("outcome_p99_ms")), "errors": p["errors"] + r["errors"],
               "first_error": p.get("first_error") or r.get("first_error"), "active_s": active, "wall_s": round(wall, 2),
               "beam_cpu_pct": pct["beam"], "redis_cpu_pct": pct["redis"],
               "ferrule_cpu_pct": sum(v for k, v in pct.items() if k.startswith("ferrule")),
               "ferrule_each_pct": [round(pct[f"ferrule{k + 1}"]) for k in range(len(instances))],
               "lg_cpu_pct": 100 * (p["_cpu"] + r["_cpu"]) / active}
        if not warm:
            self.check(key, run["errors"] == 0, f"{run['errors']} errors ({run['first_error']})")
            self.check(key, run["lost"] == 0, f"{run['lost']} of {count} messages not received "
                                              f"(sent {run['sent']}, acknowledged {run['acked']})")
        return run

    def run(self, names):
        for name in names:
            log(f"== {name}")
            try:
                getattr(self, f"scenario_{name}")()
            except Failure as e:
                self.check(name, False, str(e))
            except Exception as e:  # a harness bug must not hide the other scenarios
                self.check(name, False, f"{type(e).__name__}: {e}")
                import traceback
                traceback.print_exc()
            finally:
                for p in list(RUNNING):
                    p.kill()


# ---------------------------------------------------------------------------------------
# report

def fmt(x, digits=0):
    if x is None:
        return "–"
    if isinstance(x, float) and digits:
        return f"{x:,.{digits}f}"
    return f"{x:,.0f}"


def cell(values, digits=0, unit=""):
    mm = median_min_max(values)
    if mm is None:
        return "–"
    med, lo, hi = mm
    if len([v for v in values if v is not None]) == 1:
        return f"{fmt(med, digits)}{unit}"
    return f"{fmt(med, digits)}{unit} ({fmt(lo, digits)}–{fmt(hi, digits)})"


def med(values):
    mm = median_min_max(values)
    return mm[0] if mm else None


def machine_facts(suite):
    def cmd(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = "?"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    mosq = "not installed"
    if shutil.which("mosquitto"):
        out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout
        m = re.search(r"mosquitto version (\S+)", out)
        mosq = m.group(1) if m else "?"
    commit = cmd(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = cmd(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("nproc", str(os.cpu_count())),
        ("CPU", cpu),
        ("memory", mem),
        ("kernel", platform.release()),
        ("rustc", cmd(["rustc", "--version"])),
        ("mosquitto", mosq),
        ("Ferrule commit", commit + (" (with uncommitted changes)" if dirty else "")),
        ("binaries", f"{suite.ferrule_bin.relative_to(ROOT) if suite.ferrule_bin.is_relative_to(ROOT) else suite.ferrule_bin}"),
        ("RLIMIT_NOFILE (hard)", str(suite.nofile)),
        ("runs per scenario", str(suite.runs)),
        ("scale", str(suite.scale)),
    ]


def build_report(suite, elapsed):
    R = suite.results

    def vals(key, side, field):
        return [r.get(field) for r in R.get((key, side), [])]

    rows = []       # summary rows
    targets = []    # (target text, value text, met)

    def ratio(key, field="rate"):
        f, p = med(vals(key, "ferrule", field)), med(vals(key, "peer", field))
        return (f / p) if f and p else None

    def row(name, metric, key, field, digits=0, unit="", peer=None, pfield=None, ratio_field=None):
        rows.append((name, metric, cell(vals(key, "ferrule", field), digits, unit),
                     peer or "—", cell(vals(key, "peer", pfield or field), digits, unit) if (key, "peer") in R else "—",
                     (f"{ratio(key, ratio_field):.2f}×" if ratio_field and ratio(key, ratio_field) else "—")))

    def half_load_row(key, title, metric, f50, f99):
        """A half-load row: `title` + the paced rates, p50 / p99 of Ferrule and (if run) of
        Mosquitto at half its own rate."""
        rate, prate = med(vals(key, "ferrule", "target_rate")), med(vals(key, "peer", "target_rate"))
        both = lambda side: f"{cell(vals(key, side, f50), 2)} / {cell(vals(key, side, f99), 2)}"  # noqa: E731
        rows.append((f"{title}{fmt(rate)} msgs/s" + (f"; Mosquitto at {fmt(prate)}" if prate else "") + ")", metric,
                     both("ferrule"), "Mosquitto at half its rate" if prate else "—", both("peer") if prate else "—", "—"))

    if ("qos0", "ferrule") in R:
        row("MQTT QoS 0 telemetry, device → AMQP app", "msgs/s", "qos0", "rate", peer="Mosquitto pub → sub", ratio_field="rate")
        row("", "p50 / p99 ms (end to end)", "qos0", "p50", 2, peer="", ratio_field=None)
        rows[-1] = rows[-1][:2] + (f"{cell(vals('qos0', 'ferrule', 'p50'), 2)} / {cell(vals('qos0', 'ferrule', 'p99'), 2)}", "",
                                   f"{cell(vals('qos0', 'peer', 'p50'), 2)} / {cell(vals('qos0', 'peer', 'p99'), 2)}" if ("qos0", "peer") in R else "—", "")
        row("", "lost (not delivered)", "qos0", "lost", peer="")
        row("", "dropped, by Ferrule's own count", "qos0", "server_dropped", peer="")
    if ("qos1", "ferrule") in R:
        row("MQTT QoS 1 telemetry (PUBACK after app accept)", "msgs/s", "qos1", "rate", peer="Mosquitto QoS 1 pub → sub", ratio_field="rate")
        rows.append(("", "p50 / p99 ms (end to end)", f"{cell(vals('qos1', 'ferrule', 'p50'), 2)} / {cell(vals('qos1', 'ferrule', 'p99'), 2)}", "",
                     f"{cell(vals('qos1', 'peer', 'p50'), 2)} / {cell(vals('qos1', 'peer', 'p99'), 2)}" if ("qos1", "peer") in R else "—", ""))
        row("", "PUBACK p99 ms", "qos1", "puback_p99", 2, peer="")
    if ("qos1half", "ferrule") in R:
        half_load_row("qos1half", "QoS 1 at half load (", "PUBACK p50 / p99 ms", "puback_p50", "puback_p99")
    if ("gateway", "ferrule") in R:
        row(f"MQTT QoS 1 through gateways ({GATEWAY_DEVICES} devices each, in turn)", "msgs/s", "gateway", "rate")
        row("", "PUBACK p99 ms", "gateway", "puback_p99", 2)
    if ("events", "ferrule") in R:
        row("events, durable, QoS 1 (MQTT `event` → event/bench)", "msgs/s", "events", "rate")
        row("", "PUBACK p99 ms (on disk)", "events", "puback_p99", 2)
        row("", "end-to-end p99 ms", "events", "p99", 2)
    if ("http", "ferrule") in R:
        row("HTTP telemetry (POST /telemetry, Basic auth)", "req/s", "http", "rate", peer="bare hyper hello-world", ratio_field="rate")
        row("", "p99 ms (request → response)", "http", "p99", 2, peer="")
        row("", "failed requests (Ferrule: 503, no credit)", "http", "errors", peer="")
    if ("coap-non", "ferrule") in R:
        row("CoAP NON telemetry (delivered to the app)", "msgs/s", "coap-non", "rate")
        row("", "lost (not delivered)", "coap-non", "lost")
    if ("coap-con", "ferrule") in R:
        row("CoAP CON telemetry", "msgs/s", "coap-con", "rate")
        row("", "p99 ms (request → ACK)", "coap-con", "p99", 2)
    for size, n in getattr(suite, "idle_sizes_run", []):
        key = f"idle-{n}"
        if (key, "ferrule") in R:
            label = f"idle MQTT devices, {n:,}" + (f" (asked {size:,}: capped)" if n < size else "")
            row(label, "RSS bytes per connection (lower is better)", key, "bytes_per_conn", peer="Mosquitto, same clients", ratio_field="bytes_per_conn")
    if ("storm", "ferrule") in R:
        row("connect storm with authentication (warm)", "CONNECT/s", "storm", "rate", peer="Mosquitto with password_file", ratio_field="rate")
        row("", "cold (first connect per device)", "storm", "cold_rate", peer="")
    if ("restart", "ferrule") in R:
        n = suite.count("restart-devices")
        row(f"restart storm: {n:,} devices reconnect to a fresh process", "CONNECT/s", "restart", "rate",
            peer="Mosquitto with password_file", ratio_field="rate")
        row("", "first connect ever (argon2id per device)", "restart", "first_rate", peer="")
    if ("commands", "ferrule") in R:
        row("commands round trip (app → MQTT device → app)", "per s", "commands", "rate")
        row("", "p50 / p99 ms", "commands", "p50", 2)
        rows[-1] = rows[-1][:2] + (f"{cell(vals('commands', 'ferrule', 'p50'), 2)} / {cell(vals('commands', 'ferrule', 'p99'), 2)}", "—", "—", "—")
    if ("halfload", "ferrule") in R:
        half_load_row("halfload", "p99 at half load (QoS 0 at ", "p50 / p99 ms", "p50", "p99")

    def target(text, value_text, met):
        targets.append((text, value_text, "met" if met else ("not met" if met is not None else "not measured")))

    r0 = ratio("qos0")
    target("QoS 0 ≥ 1.5× Mosquitto", f"{r0:.2f}×" if r0 else "–", (r0 >= 1.5) if r0 else None)
    r1 = ratio("qos1")
    target("QoS 1 ≥ 1.0× Mosquitto", f"{r1:.2f}×" if r1 else "–", (r1 >= 1.0) if r1 else None)
    ev, evp = med(vals("events", "ferrule", "rate")), med(vals("events", "ferrule", "puback_p99"))
    target("durable events ≥ 50k msgs/s with p99 ≤ 20 ms (PUBACK)", f"{fmt(ev)} msgs/s, p99 {fmt(evp, 2)} ms" if ev else "–",
           (ev >= 50_000 and evp is not None and evp <= 20) if ev else None)
    rh = ratio("http")
    target("HTTP ≥ 0.5× bare hyper", f"{rh:.2f}×" if rh else "–", (rh >= 0.5) if rh else None)
    cn = med(vals("coap-non", "ferrule", "rate"))
    target("CoAP NON ≥ 50k msgs/s", f"{fmt(cn)} msgs/s" if cn else "–", (cn >= 50_000) if cn else None)
    idle_keys = [f"idle-{n}" for _, n in getattr(suite, "idle_sizes_run", [])]
    if idle_keys:
        worst = max((med(vals(k, "ferrule", "bytes_per_conn")) or 0) for k in idle_keys)
        target("idle ≤ 4 KiB RSS per device", f"{fmt(worst)} B (largest of the sizes run)", worst <= 4096 if worst else None)
    else:
        target("idle ≤ 4 KiB RSS per device", "–", None)
    st = med(vals("storm", "ferrule", "rate"))
    target("connect storm ≥ 5k CONNECT/s", f"{fmt(st)} /s" if st else "–", (st >= 5000) if st else None)
    rs = med(vals("restart", "ferrule", "rate"))
    target("restart storm ≥ 1,000 CONNECT/s", f"{fmt(rs)} /s" if rs else "–", (rs >= 1000) if rs else None)
    hl, hlp = med(vals("halfload", "ferrule", "p99")), med(vals("halfload", "peer", "p99"))
    if hlp:
        target("p99 at half load ≤ 1.0× Mosquitto's p99 at its half load",
               f"{fmt(hl, 2)} ms vs {fmt(hlp, 2)} ms ({hl / hlp:.2f}×)" if hl is not None else "–",
               (hl <= hlp) if hl is not None else None)
    else:
        target("p99 ≤ 2 ms at half load", f"{fmt(hl, 2)} ms" if hl is not None else "–", (hl <= 2) if hl is not None else None)
    if ("iso-hostile", "ferrule") in R:
        ib, ih = med(vals("iso-baseline", "ferrule", "p99")), med(vals("iso-hostile", "ferrule", "p99"))
        ir = ih / ib if ib and ih else None
        target("isolation: tenant B's p99 beside a hostile tenant ≤ 2× its baseline",
               f"{ir:.2f}× ({fmt(ib, 2)} → {fmt(ih, 2)} ms)" if ir else "–", (ir <= 2) if ir else None)

    cpu_rows = []
    for key, label in [("iso-baseline", "isolation: tenant B alone"), ("iso-hostile", "isolation: B beside hostile A (loadgen: B's only)"),
                       ("qos0", "MQTT QoS 0"), ("halfload", "QoS 0 at half load"), ("qos1", "MQTT QoS 1"), ("qos1half", "QoS 1 at half load"),
                       ("gateway", "MQTT QoS 1 via gateways"), ("events", "events"),
                       ("http", "HTTP"), ("coap-non", "CoAP NON"), ("coap-con", "CoAP CON"), ("storm", "connect storm"), ("restart", "restart storm"),
                       ("commands", "commands")]:
        if (key, "ferrule") in R:
            cpu_rows.append((label, cell(vals(key, "ferrule", "server_cpu_pct"), unit=" %"), cell(vals(key, "ferrule", "lg_cpu_pct"), unit=" %"),
                             cell(vals(key, "peer", "server_cpu_pct"), unit=" %") if (key, "peer") in R else "—",
                             cell(vals(key, "peer", "lg_cpu_pct"), unit=" %") if (key, "peer") in R else "—"))

    out = []
    w = out.append
    w("# Ferrule benchmarks\n")
    w("Generated by `python3 tests/loadgen/bench.py` (the harness: [tests/loadgen](tests/loadgen/README.md)). "
      "Ferrule and its peer run side by side in the same run on the same machine, with the same load generator "
      "(`ferrule-loadgen`) and the same clients; every figure is the median of the runs with the minimum–maximum "
      "in parentheses. The load generator shares the machine's cores with the server under test.\n")
    w("## Machine\n")
    w("| | |\n|---|---|")
    for k, v in machine_facts(suite):
        w(f"| {k} | {v} |")
    w(f"| suite wall time | {elapsed / 60:.1f} min |\n")
    w("## Results\n")
    w("| scenario | metric | Ferrule | peer | peer result | Ferrule/peer |\n|---|---|---|---|---|---|")
    for r in rows:
        w("| " + " | ".join(r) + " |")
    w("")
    flow_keys = sorted({k for k, _ in R if k.startswith("flow-")})
    if flow_keys:
        w("## Flow control: bursts the application can absorb\n")
        w("Publishers × QoS 1 window each, 64 B messages, the AMQP application with the link credit shown "
          "(`amqp-recv --credit`, it accepts at once); Mosquitto's subscriber (QoS as the publishers) has no "
          "credit. `received/sent`: messages delivered of those published (QoS 1: acknowledged); `errors`: "
          "publisher failures (a lost connection counts).\n")
        w("| shape | QoS | credit | Ferrule msgs/s | Ferrule received/sent | Ferrule errors | Mosquitto msgs/s | "
          "Mosquitto received/sent | Mosquitto errors | Ferrule/Mosquitto |\n|---|---|---|---|---|---|---|---|---|---|")
        for key in flow_keys:
            if (key, "ferrule") not in R:
                continue
            _, shape, q = key.split("-")[:3]
            credit = key.split("credit")[1] if "credit" in key else "–"
            peer_key = f"flow-{shape}-{q}"
            def got(side, k):
                runs = R.get((k, side), [])
                return "/".join([fmt(med([r["received"] for r in runs])), fmt(med([r["sent"] for r in runs]))]) if runs else "–"
            f, p = med(vals(key, "ferrule", "rate")), med(vals(peer_key, "peer", "rate"))
            w(f"| {shape} | {q[3:]} | {credit} | {cell(vals(key, 'ferrule', 'rate'))} | {got('ferrule', key)} | "
              f"{cell(vals(key, 'ferrule', 'errors'))} | {cell(vals(peer_key, 'peer', 'rate'))} | {got('peer', peer_key)} | "
              f"{cell(vals(peer_key, 'peer', 'errors'))} | {f'{f / p:.2f}×' if f and p else '–'} |")
        w("")
    overload_keys = [k for k in ("overload-half", "overload-far") if (k, "ferrule") in R]
    if overload_keys:
        w("## Overload: the application slower than its devices\n")
        w("10 MQTT 3.1.1 QoS 1 devices (window 100 each) send 4,000 msgs/s for 30 s; the AMQP application "
          "(credit 100) accepts the rate shown. Messages wait for the application (the device's PUBACK comes "
          "later) up to `consumer_wait` (5 s) and `consumer_wait_bytes` (1 MiB); past either the device is "
          "refused (MQTT 3.1.1: the connection is closed). `held`/`released past the bound`: "
          "`ferrule_direct_held_total` / `ferrule_direct_held_expired_total` over the run.\n")
        w("| metric | " + " | ".join(f"application at {fmt(med(vals(k, 'ferrule', 'app_rate')))}/s" for k in overload_keys)
          + " |\n|---|" + "---|" * len(overload_keys))
        for field, label, digits in [("sent", "published", 0), ("acked", "acknowledged (PUBACK)", 0),
                                     ("received", "received by the application", 0),
                                     ("puback_p50", "PUBACK p50 ms", 1), ("puback_p99", "PUBACK p99 ms", 1),
                                     ("puback_max", "PUBACK max ms", 1), ("errors", "device errors (disconnects)", 0),
                                     ("held", "held for the application", 0), ("held_expired", "released past the wait bound", 0),
                                     ("rss_start", "Ferrule RSS at start, bytes", 0), ("rss_max", "Ferrule RSS max, bytes", 0)]:
            w(f"| {label} | " + " | ".join(cell(vals(k, 'ferrule', field), digits) for k in overload_keys) + " |")
        w("")
    if ("iso-hostile", "ferrule") in R:
        isolation_report(w, R, vals)
    peer_keys = [k for k, side in R if k.startswith("peer-") and side == "peer"]
    if peer_keys:
        w("## Peer sweep: Mosquitto with more publishers and deeper windows\n")
        w("Mosquitto pub → sub alone, as in the QoS 0 / QoS 1 rows, with the publisher connections × QoS 1 window "
          "shown: where its throughput stops rising.\n")
        w("| QoS | publishers × window | msgs/s | received/sent |\n|---|---|---|---|")
        for key in peer_keys:
            _, q, shape = key.split("-")
            runs = R[(key, "peer")]
            w(f"| {q[3:]} | {shape} | {cell(vals(key, 'peer', 'rate'))} | "
              f"{fmt(med([r['received'] for r in runs]))}/{fmt(med([r['sent'] for r in runs]))} |")
        w("")
    w("## Targets\n")
    w("| target | measured (median) | |\n|---|---|---|")
    for t in targets:
        w(f"| {t[0]} | {t[1]} | {t[2]} |")
    w("")
    w("## CPU\n")
    w("User + system CPU seconds over the measured interval (publishers' first send to the receiver's last "
      "message), as % of one core; `loadgen` adds up every load generator process of the run.\n")
    w("| scenario | Ferrule | loadgen (vs Ferrule) | peer | loadgen (vs peer) |\n|---|---|---|---|---|")
    for r in cpu_rows:
        w("| " + " | ".join(r) + " |")
    w("")
    w("## Scenarios\n")
    a = suite.args
    w(f"- Ferrule: `ferrule serve` from a generated config (log level warn, its own temp data dir, every listener on "
      f"127.0.0.1 with an ephemeral port read back from `listeners.json`, MQTT `max_connections` raised"
      f"{', MQTT workers = ' + str(a.mqtt_workers) if a.mqtt_workers else ', everything else at its default'}); tenant "
      f"`{TENANT}` and devices `dev0..` with passwords created over the management API; the application is "
      f"`ferrule-loadgen amqp-recv` (SASL PLAIN `{APP_USER}`, credit 5000, accepts every message). Mosquitto: a generated "
      f"config (`listener PORT 127.0.0.1`, `allow_anonymous true`, `persistence false`, `max_inflight_messages 1000`, "
      f"`max_queued_messages 1000000`; `password_file` made with `mosquitto_passwd -U` for the storm); the application "
      f"is `ferrule-loadgen mqtt-sub`.")
    q1 = QOS1_SHAPE if a.window == 16 and a.connections == 8 else (a.connections, a.window)
    w(f"- MQTT: {a.connections} publisher connections (one device each on Ferrule) for QoS 0 and events, {q1[0]} with a "
      f"window of {q1[1]} each for QoS 1 (the peer sweep shows where Mosquitto stops rising), payload {a.size} bytes starting "
      f"with the send timestamp, events window {a.window} per connection; QoS 0 {suite.count('qos0'):,} messages "
      f"per run, QoS 1 {suite.count('qos1'):,}, events {suite.count('events'):,}; a warm-up run (a tenth of the count) before the measured runs "
      "of each server. QoS 0 is flat out: Ferrule holds what the application cannot take yet and slows the "
      "publishers (see Flow control), Mosquitto queues it.")
    w(f"- HTTP: {a.http_connections} keep-alive connections, one request at a time each, {suite.count('http'):,} requests "
      "per run; Ferrule: `POST /telemetry` with Basic auth (QoS 0, answered 202 after routing), an application "
      "receiving; peer: the same requests to a bare hyper 1 hello-world server (`ferrule-loadgen hello-server`).")
    w(f"- CoAP: {a.connections} UDP clients with 8 requests outstanding each (Ferrule's `max_in_flight_per_peer`), "
      f"`PUT /telemetry/{TENANT}/devN` (unauthenticated), {suite.count('coap'):,} per run; NON is paced by Ferrule's NON "
      "responses and measured at the application, CON by the piggy-backed ACKs.")
    w("- Idle: MQTT 3.1.1 connections without credentials (CONNECT with keep-alive 600 s, then nothing), from "
      f"source addresses {IDLE_SOURCES.split(',')[0]}–{IDLE_SOURCES.split(',')[-1]}; a fresh server per run, 100 "
      "connections opened and closed first, RSS (VmRSS) read before and 2 s after the last CONNACK; bytes per "
      "connection = difference / connections.")
    w(f"- Connect storm: {suite.count('storm-devices')} devices with passwords, {8 if suite.smoke else 32} workers each looping CONNECT → CONNACK → "
      "DISCONNECT for the run's duration (first run: every device connected once before, timed as the cold rate: "
      "Ferrule verifies an argon2id hash once per device, then caches the verification). Ferrule also sends a "
      "durable connection event (connected, disconnected) to `event/bench` for every connection; no application "
      "consumes them here, so the queue fills up to `queue_max_depth` and further ones are refused (logged at debug).")
    w(f"- Restart storm: {suite.count('restart-devices'):,} devices with passwords, {8 if suite.smoke else 32} workers; every device "
      "connects once (Ferrule: argon2id, the first-connect row), then each run restarts the server (SIGTERM, a fresh "
      "process over the same data) and every device connects once more, timed. Ferrule runs with `[registry] "
      "verifier_key_file` (a 32-byte key outside the data directory; SECURITY.md, \"Password verifiers\"): a password "
      "that passed argon2 once passes on its keyed verifier. Mosquitto checks its password_file (PBKDF2-SHA512).")
    w(f"- Commands: {min(10, a.connections)} MQTT devices subscribed to `command///req/#` (QoS 1) answering every request on "
      f"`command///res/REQ-ID/200`, an AMQP application with 32 commands in flight, {suite.count('commands'):,} per run.")
    w("- Half load: the QoS 0 scenario paced at half the measured median throughput; QoS 1 at half load likewise for the QoS 1 scenario (its PUBACK latency).")
    w(f"- Gateways: the QoS 1 scenario's publishers and window, each publisher a gateway `gwN` publishing for its "
      f"{GATEWAY_DEVICES} devices `gwN-dK` in turn (`telemetry/bench/gwN-dK`; the devices name the gateway in `via`). "
      "Ferrule only.")
    if ("iso-hostile", "ferrule") in R:
        w("- Isolation (opt-in: `--only isolation`): see its section; one Ferrule for every run, each run a baseline "
          "phase then a hostile phase of the same length, after a 2 s warm-up of tenant B.")
    w("")
    if suite.notes or suite.failures or suite.server_errors:
        w("## Notes\n")
        for n in suite.notes:
            w(f"- {n}")
        for key, msg in suite.failures:
            w(f"- FAILED {key}: {msg}")
        for name, count, lines in suite.server_errors:
            w(f"- Ferrule (`{name}` scenario) logged {count} warning/error line(s), e.g. " +
              "; ".join(f"`{l.strip()[:240]}`" for l in lines))
        w("")
    w("## Reproduce\n")
    w("```sh")
    w("python3 tests/loadgen/bench.py                      # everything (installs mosquitto if missing, release build)")
    w("python3 tests/loadgen/bench.py --only qos0 --runs 5 # one scenario")
    w("python3 tests/loadgen/bench.py --smoke              # the CI check: tiny counts, debug binaries")
    w("```\n")
    w("The load generator's commands of one run of each scenario ($MQTT, $AMQP, $HTTP, $COAP: the addresses "
      "from `listeners.json` or the peer's port):\n")
    w("```sh")
    for key, argvs in suite.examples.items():
        w(f"# {key}")
        for a_ in argvs:
            w(a_)
    w("```\n")
    w("<details><summary>Every run (raw)</summary>\n")
    w("```")
    for (key, side), runs in sorted(R.items()):
        for i, r in enumerate(runs):
            w(f"{key} {side} #{i + 1}: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))
    w("```\n</details>\n")
    return "\n".join(out), targets


# --attacker-nice, for the report.
ARGS_NICE = [0]


def isolation_report(w, R, vals):
    """The isolation scenario's section: tenant B baseline vs hostile, tenant A's refusals."""
    runs = R[("iso-hostile", "ferrule")]
    w("## Isolation: a hostile tenant beside a well-behaved one\n")
    w(f"One Ferrule with `[adapters] max_messages_per_second_per_tenant = {ISO['tenant_rate']}` (each tenant's own "
      f"bucket). Tenant `{ISO_B}` (well-behaved): {ISO['b_devices']} MQTT 3.1.1 devices (`ferrule-loadgen mqtt-pub`, QoS 1, "
      f"window 16) send {ISO['b_rate']} msgs/s in total to B's AMQP application (`amqp-recv`, credit 5000); latency is "
      "end to end, from the send time in the payload. Baseline: tenant A idle. Hostile: for the whole of B's phase, "
      f"tenant `{ISO_A}` (`resource-limits.max-connections` = {ISO['a_max_connections']}) runs "
      f"`tests/loadgen/hostile_tenant.py`: {ISO['a_connections']} MQTT 5 devices (refused ones retry every second) "
      f"flooding QoS 1 telemetry at {ISO['a_rate']:,} msgs/s attempted (Python: it reaches what it can), while its AMQP "
      f"application sends one {ISO['big_mib']} MiB event, one body nested {ISO['depth']:,} lists deep, and attaches "
      f"receivers on {runs[0].get('a', {}).get('amqp', {}).get('receivers', {}).get('asked', 0):,} fresh "
      f"`command_response/{ISO_A}/<uuid>` reply addresses (pipelined, 200 at a time, held to the end); an `amqp-recv` "
      "consumes A's telemetry. The hostile tenant's load generator runs on the same cores as Ferrule and B: its CPU is "
      "shown, and part of B's hostile-phase latency is that contention, not Ferrule"
      + (f"; here it ran at `nice -n {ARGS_NICE[0]}` (`--attacker-nice`), taking what Ferrule and B leave"
         if ARGS_NICE[0] else "") + ".\n")
    w("| tenant B | baseline (A idle) | hostile (A attacking) | hostile / baseline |\n|---|---|---|---|")

    def line(label, field, digits=2, scale=1.0):
        b = [None if v is None else v / scale for v in vals("iso-baseline", "ferrule", field)]
        h = [None if v is None else v / scale for v in vals("iso-hostile", "ferrule", field)]
        mb, mh = med(b), med(h)
        w(f"| {label} | {cell(b, digits)} | {cell(h, digits)} | {f'{mh / mb:.2f}×' if mb and mh else '–'} |")

    line("end-to-end p50 ms", "p50")
    line("end-to-end p99 ms", "p99")
    line("end-to-end max ms", "max")
    line("PUBACK p99 ms", "puback_p99")
    got = lambda k: "/".join(fmt(med(vals(k, "ferrule", f))) for f in ("received", "sent"))  # noqa: E731
    w(f"| received / sent | {got('iso-baseline')} | {got('iso-hostile')} | |")
    line("Ferrule RSS max, MiB (sampled every 0.2 s)", "rss_max", 1, 1024 * 1024)
    line("Ferrule CPU, % of one core", "server_cpu_pct", 0)
    w(f"| hostile_tenant.py CPU, % of one core | – | {cell(vals('iso-hostile', 'ferrule', 'a_cpu_pct'))} | |")
    w(f"| p99 ratio, per run | | {cell(vals('iso-hostile', 'ferrule', 'p99_ratio'), 2)} | |")
    w(f"| B's 1 s check once A has left, received / sent | | {', '.join(str(r.get('after_received')) for r in runs)} | |")
    w("")

    def a_med(path):
        out = []
        for r in runs:
            v = r.get("a", {})
            for k in path:
                v = v.get(k, {}) if isinstance(v, dict) else {}
            out.append(v if isinstance(v, (int, float)) else 0)
        return med(out)

    def outcomes(attack):
        seen = sorted({str(r.get("a", {}).get("amqp", {}).get(attack, {}).get("outcome", "not run")) for r in runs})
        return "; ".join(f"`{o}`" for o in seen)

    codes = lambda field: sorted({c for r in runs for c in r.get("a", {}).get("mqtt", {}).get(field, {})})  # noqa: E731
    refused_conds = sorted({c for r in runs for c in r.get("a", {}).get("amqp", {}).get("receivers", {}).get("refused", {})})
    w("Tenant A, as its own clients saw it (median of the runs):\n")
    w("| tenant A's attack | attempted | refused | let through |\n|---|---|---|---|")
    connack_refused = ", ".join(f"{fmt(a_med(['mqtt', 'connack', c]))} × CONNACK {c}" for c in codes("connack") if c != "0x00") or "none"
    w(f"| MQTT connections: {ISO['a_connections']} devices for max-connections {ISO['a_max_connections']}, refused ones retrying "
      f"every second | {fmt(a_med(['mqtt', 'connect_attempts']))} CONNECTs | {connack_refused} | "
      f"{fmt(a_med(['mqtt', 'connack', '0x00']))} accepted, at most {fmt(a_med(['mqtt', 'most_connected_at_once']))} at once |")
    puback_refused = ", ".join(f"{fmt(a_med(['mqtt', 'puback', c]))} × PUBACK {c}" for c in codes("puback") if c != "0x00") or "none"
    ok, flood_s = a_med(["mqtt", "puback", "0x00"]), a_med(["mqtt", "seconds"])
    w(f"| MQTT 5 QoS 1 telemetry, {ISO['a_rate']:,} msgs/s attempted (tenant rate {ISO['tenant_rate']}/s) | "
      f"{fmt(a_med(['mqtt', 'pubacks']))} answered in {fmt(flood_s, 1)} s | {puback_refused} | {fmt(ok)} × PUBACK 0x00 "
      f"(≈ {fmt(ok / flood_s if flood_s else None)}/s) |")
    disc = ", ".join(f"{fmt(a_med(['mqtt', 'server_disconnect', c]))} × DISCONNECT {c}" for c in codes("server_disconnect"))
    if disc or a_med(["mqtt", "closed_without_disconnect"]):
        w(f"| MQTT connections the server closed | | {disc or ''} {fmt(a_med(['mqtt', 'closed_without_disconnect']))} closed without DISCONNECT | |")
    w(f"| AMQP event of {ISO['big_mib']} MiB to `event/{ISO_A}` | 1 | {outcomes('big_message')} | |")
    w(f"| AMQP message to `telemetry/{ISO_A}`, body nested {ISO['depth']:,} lists deep (hand-encoded) | 1 | "
      f"{outcomes('nested_body')} | |")
    rec_refused = ", ".join(f"{fmt(a_med(['amqp', 'receivers', 'refused', c]))} × `{c}`" for c in refused_conds) or "none"
    no_answer = a_med(["amqp", "receivers", "no_answer"])
    w(f"| AMQP receivers on fresh `command_response/{ISO_A}/<uuid>` | {fmt(a_med(['amqp', 'receivers', 'asked']))} attaches | "
      f"{rec_refused}{f', {fmt(no_answer)} unanswered' if no_answer else ''} | "
      f"{fmt(a_med(['amqp', 'receivers', 'attached']))} attached and held |")
    w("")
    timing = []
    for r in runs:
        amqp, (b0, b1) = r.get("a", {}).get("amqp", {}), r.get("b_window", (0, 0))
        spans = [f"{name} {amqp[k]['started'] - b0:.1f}–{amqp[k].get('attach_ended', amqp[k].get('ended', 0)) - b0:.1f} s"
                 for k, name in (("big_message", "64 MiB event"), ("nested_body", "nested body"), ("receivers", "attaches"))
                 if amqp.get(k, {}).get("started") is not None]
        timing.append(f"B sent for {b1 - b0:.1f} s; A's {', '.join(spans)} from B's start")
    w("When (each run): " + " / ".join(timing) + ". A's MQTT flood ran from before B's first message to after its last.\n")
    series = sorted({k for r in runs for k in r.get("counters", {})})
    if series:
        w("Ferrule's own counters, increase over the hostile phase (median of the runs):\n")
        w("| series | increase |\n|---|---|")
        for k in series:
            w(f"| `{k}` | {fmt(med([r.get('counters', {}).get(k, 0) for r in runs]))} |")
        w("")


def scaleout_block(suite):
    """The scale-out section (between SCALEOUT_BEGIN and SCALEOUT_END), or None if it did not run."""
    R = suite.results
    if not any(k.startswith("so-") for k, _ in R):
        return None
    vals = lambda key, side, field: [r.get(field) for r in R.get((key, side), [])]  # noqa: E731
    info = getattr(suite, "scaleout_info", {})
    rabbit, redis = info.get("versions", ("?", "?"))
    facts = dict(machine_facts(suite))
    ns = [n for n in SCALEOUT["instances"] if (f"so-event-{n}", "ferrule") in R or (f"so-telemetry-{n}", "ferrule") in R]
    devices, window = SCALEOUT["devices"], SCALEOUT["window"]
    out = []
    w = out.append
    w(SCALEOUT_BEGIN)
    w("### Scale-out (issue 14): 1, 2 and 3 instances over RabbitMQ, against the broker alone\n")
    a = suite.args
    cmdline = " ".join(["python3 tests/loadgen/bench.py --only scaleout"] + ([f"--runs {a.runs}"] if a.runs else [])
                       + ([f"--scale {a.scale:g}"] if a.scale != 1 else [])
                       + ([f"--backend-credit {a.backend_credit}"] if a.backend_credit else []))
    built = datetime.datetime.fromtimestamp(suite.ferrule_bin.stat().st_mtime, datetime.timezone.utc).strftime("%H:%M UTC")
    w(f"`{cmdline}` ({facts['date']}; `{facts['binaries']}` built {built}, git HEAD when reporting {facts['Ferrule commit']}; "
      f"release build; RabbitMQ {rabbit} with `rabbitmq_amqp1_0`, one node; Redis {redis}, a Redis Cluster of 3 masters; "
      f"{facts['nproc']} cores shared by all of them and the load generator; {suite.runs} runs per row after a warm-up, "
      f"{info.get('count', 0):,} messages of {suite.args.size} bytes per run; median (min–max)).\n")
    w(f"- **Through Ferrule**: N `ferrule serve` instances in cluster mode, each with its own data dir and the TOML of "
      f"`tests/cluster/conftest.py` (`[messaging.backend] kind = \"amqp\"`, `addresses = \"rabbitmq\"`, registry and "
      f"consumer leases on the Redis Cluster, every role; log level warn). {devices} MQTT 3.1.1 devices (one "
      f"`ferrule-loadgen mqtt-pub`, QoS 1, window {window} each) spread evenly over the N instances' MQTT listeners "
      f"(`--host` list); one application (`amqp-recv`, credit {SCALEOUT['credit']}) on `event/bench` or "
      "`telemetry/bench` at the first instance only. `[messaging.backend] credit` (what RabbitMQ may hand an "
      "instance's bridge ahead of the application): "
      + (f"**{suite.args.backend_credit}** (`--backend-credit`; Ferrule's default is 256)" if suite.args.backend_credit
         else "Ferrule's default") + ". Events go to the quorum queue `event.bench` (durable), "
      "telemetry to the classic queue `telemetry.bench` under the telemetry policy; the first instance's bridge "
      "consumes them for the application. A device's PUBACK follows RabbitMQ's `accepted`.")
    w(f"- **Broker ceiling**: `ferrule-loadgen amqp-send` (one link, unsettled, window {devices * window} = the devices' "
      "total QoS 1 window; durable messages for events) and `amqp-recv` (credit "
      f"{SCALEOUT['credit']}) straight at RabbitMQ as guest: quorum queue `event.ceiling` (made through the management "
      "API as Ferrule makes `event.T`), and `/amq/queue/telemetry.ceiling` → `/queue/telemetry.ceiling` under the same "
      "telemetry policy (`message-ttl` 2 s, `max-length` 100,000 drop-head). Same payload; Ferrule's messages carry "
      "Hono's properties besides.")
    w("- msgs/s: received by the application, first to last message. CPU: user + system seconds from `/proc/PID/stat` "
      "of beam.smp, the three redis-server processes and each Ferrule instance (and the load generators' rusage) over "
      "the run, as % of one core over the active interval (first send to last message received).\n")
    header = "| | broker alone | " + " | ".join(f"{n} instance{'s' if n > 1 else ''}" for n in ns) + " |"
    w(header)
    w("|---|---|" + "---|" * len(ns))
    for kind, label in (("event", "events (quorum queue, durable)"), ("telemetry", "telemetry, QoS 1 (classic queue, policy)")):
        ceiling = med(vals(f"so-{kind}-ceiling", "broker", "rate"))
        w(f"| **{label}**, msgs/s received | {cell(vals(f'so-{kind}-ceiling', 'broker', 'rate'))} | " + " | ".join(
            cell(vals(f"so-{kind}-{n}", "ferrule", "rate")) for n in ns) + " |")
        ratios = []
        for n in ns:
            m = med(vals(f"so-{kind}-{n}", "ferrule", "rate"))
            ratios.append(f"**{m / ceiling:.2f}×**" if m and ceiling else "–")
        w(f"| {kind}: ratio to the broker alone | 1 | " + " | ".join(ratios) + " |")
        both = lambda key, side: f"{cell(vals(key, side, 'p50'), 1)} / {cell(vals(key, side, 'p99'), 1)}"  # noqa: E731
        w(f"| {kind}: end-to-end p50 / p99 ms | {both(f'so-{kind}-ceiling', 'broker')} | " +
          " | ".join(both(f"so-{kind}-{n}", "ferrule") for n in ns) + " |")
        w(f"| {kind}: outcome (broker) / PUBACK (Ferrule) p99 ms | {cell(vals(f'so-{kind}-ceiling', 'broker', 'puback_p99'), 1)} | "
          + " | ".join(cell(vals(f"so-{kind}-{n}", "ferrule", "puback_p99"), 1) for n in ns) + " |")
        w(f"| {kind}: lost, errors (sum of runs) | {sum(v or 0 for v in vals(f'so-{kind}-ceiling', 'broker', 'lost'))}, "
          f"{sum(v or 0 for v in vals(f'so-{kind}-ceiling', 'broker', 'errors'))} | " +
          " | ".join(f"{sum(v or 0 for v in vals(f'so-{kind}-{n}', 'ferrule', 'lost'))}, "
                     f"{sum(v or 0 for v in vals(f'so-{kind}-{n}', 'ferrule', 'errors'))}" for n in ns) + " |")
    w("")
    w("CPU, % of one core over the active interval (median of the runs; Ferrule per instance, the application's first):\n")
    w("| run | beam.smp | Ferrule, all instances | Ferrule per instance | Redis (3 nodes) | load generators |\n"
      "|---|---|---|---|---|---|")
    for kind in ("event", "telemetry"):
        for n in ["ceiling"] + ns:
            key, side = f"so-{kind}-{n}", ("broker" if n == "ceiling" else "ferrule")
            if (key, side) not in R:
                continue
            each = "–"
            if n != "ceiling":
                per = [r.get("ferrule_each_pct") or [] for r in R[(key, side)]]
                each = " + ".join(fmt(med([p[k] for p in per if len(p) > k])) for k in range(n)) + " %"
            w(f"| {kind}, {'broker alone' if n == 'ceiling' else f'{n} instance' + ('s' if n > 1 else '')} | "
              f"{cell(vals(key, side, 'beam_cpu_pct'), unit=' %')} | "
              f"{'–' if n == 'ceiling' else cell(vals(key, side, 'ferrule_cpu_pct'), unit=' %')} | {each} | "
              f"{cell(vals(key, side, 'redis_cpu_pct'), unit=' %')} | {cell(vals(key, side, 'lg_cpu_pct'), unit=' %')} |")
    w("")
    fails = [(k, m) for k, m in suite.failures if k.startswith("so") or k == "scaleout"]
    warns = [(n, c, l) for n, c, l in suite.server_errors if n.startswith("so")]
    if fails or warns:
        for key, msg in fails:
            w(f"- FAILED {key}: {msg}")
        for name, c, lines in warns:
            w(f"- Ferrule `{name}` logged {c} warning/error line(s), e.g. " + "; ".join(f"`{l.strip()[:240]}`" for l in lines))
        w("")
    w("<details><summary>Commands and every run (raw)</summary>\n")
    w("```sh")
    for key, argvs in suite.examples.items():
        if key.startswith("so-"):
            w(f"# {key}")
            for a_ in argvs:
                w(a_)
    w("```\n")
    w("```")
    for (key, side), runs in sorted(R.items()):
        if key.startswith("so-"):
            for i, r in enumerate(runs):
                w(f"{key} {side} #{i + 1}: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))
    w("```\n</details>")
    w(SCALEOUT_END)
    return "\n".join(out)


def merge_block(path, block, begin, end):
    """Puts `block` (from `begin` to `end`) into `path`, changing nothing else: in place of the
    previous block, or else just after the analysis marker's opening paragraph (below the
    marker, so that full runs keep it), or at the end."""
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1]
        new = head + block + tail
    elif ANALYSIS_MARKER in old:
        head, rest = old.split(ANALYSIS_MARKER, 1)
        at = rest.find("\n### ")
        at = len(rest) if at < 0 else at + 1
        new = head + ANALYSIS_MARKER + rest[:at] + block + "\n\n" + rest[at:]
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + block + "\n"
    path.write_text(new)


def write_report(path, text):
    preserved = None
    if path.exists():
        old = path.read_text()
        if ANALYSIS_MARKER in old:
            preserved = old.split(ANALYSIS_MARKER, 1)[1]
    if preserved is None:
        preserved = "\n<!-- The lead fills this section in: what the figures mean, bottlenecks, what to do next. "\
                    "bench.py keeps everything below the marker line above when it rewrites this file. -->\n"
    path.write_text(text + "\n## Analysis\n\n" + ANALYSIS_MARKER + preserved)


# ---------------------------------------------------------------------------------------
# main

def build(smoke, args):
    if args.no_build:
        return
    profile = [] if smoke else ["--release"]
    if smoke:
        # CI builds the workspace before; build only what is missing or older than its sources.
        lg = ROOT / "target" / "debug" / "ferrule-loadgen"
        fe = ROOT / "target" / "debug" / "ferrule"
        src_mtime = max(p.stat().st_mtime for p in (ROOT / "tests" / "loadgen").rglob("*") if p.is_file() and "target" not in p.parts)
        if fe.exists() and lg.exists() and lg.stat().st_mtime >= src_mtime:
            return
    cmd = ["cargo", "build", *profile, "-p", "ferrule", "-p", "ferrule-loadgen"]
    log("building: " + " ".join(cmd))
    subprocess.run(cmd, cwd=ROOT, check=True)


def install_mosquitto(args):
    if args.no_install or (shutil.which("mosquitto") and shutil.which("mosquitto_passwd")):
        return
    log("installing mosquitto (Debian package)")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(sudo + ["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "mosquitto"], check=False, env=env)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny counts, debug binaries, one run; exit 1 on failure (CI)")
    ap.add_argument("--runs", type=int, help="runs per scenario (default 3; smoke 1)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies message counts and durations (full mode)")
    ap.add_argument("--only", help=f"comma-separated scenarios: {','.join(SCENARIOS)} "
                                   f"({', '.join(OPT_IN)}: only when named here)")
    ap.add_argument("--skip", default="", help="comma-separated scenarios to leave out")
    ap.add_argument("--out", help="report file (default: BENCHMARKS.md; smoke: a temp file)")
    ap.add_argument("--no-build", action="store_true", help="use the binaries as they are")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install mosquitto")
    ap.add_argument("--no-peer", action="store_true", help="Ferrule only")
    ap.add_argument("--ferrule-bin", help="ferrule binary (default target/release or target/debug with --smoke)")
    ap.add_argument("--loadgen-bin", help="ferrule-loadgen binary")
    ap.add_argument("--workdir", help="keep logs, configs and outputs here (default: a temp dir, removed on success)")
    ap.add_argument("--connections", type=int, default=8, help="MQTT publisher connections / devices / CoAP clients")
    ap.add_argument("--http-connections", type=int, default=16)
    ap.add_argument("--window", type=int, default=16, help="MQTT QoS 1 in-flight window per connection")
    ap.add_argument("--size", type=int, default=64, help="payload bytes")
    ap.add_argument("--idle-sizes", default="10000,100000", help="idle connection counts (full mode)")
    ap.add_argument("--attacker-nice", type=int, default=0,
                    help="isolation: run the hostile tenant's load generator at this nice level (default 0)")
    ap.add_argument("--backend-credit", type=int,
                    help="scaleout: Ferrule's [messaging.backend] credit (default: Ferrule's default)")
    ap.add_argument("--mqtt-workers", type=int, help="Ferrule [adapters.mqtt] workers (default: Ferrule's default)")
    args = ap.parse_args()
    ARGS_NICE[0] = args.attacker_nice

    names = args.only.split(",") if args.only else [n for n in SCENARIOS if n not in OPT_IN]
    names = [n for n in names if n not in args.skip.split(",")]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenarios {unknown}; known: {SCENARIOS}")

    build(args.smoke, args)
    if not args.smoke:
        install_mosquitto(args)
    suite = Suite(args)
    for b in (suite.ferrule_bin, suite.loadgen_bin):
        if not b.exists():
            sys.exit(f"missing {b}: build it first (cargo build{'' if args.smoke else ' --release'} -p ferrule -p ferrule-loadgen)")
    log(f"workdir {suite.workdir}; {suite.runs} run(s) per scenario; RLIMIT_NOFILE {suite.nofile}")

    def on_signal(signum, frame):
        for p in list(RUNNING):
            p.kill()
        sys.exit(130)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    try:
        suite.run(names)
    finally:
        for p in list(RUNNING):
            p.kill()
    elapsed = time.time() - T0
    text, targets = build_report(suite, elapsed)
    if args.out:
        out = Path(args.out)
    elif args.smoke:
        out = Path(tempfile.gettempdir()) / "ferrule-BENCHMARKS-smoke.md"
    else:
        out = ROOT / "BENCHMARKS.md"
    if not (names and all(n in MERGED for n in names)):
        write_report(out, text)
    block = scaleout_block(suite)
    if block:
        merge_block(out, block, SCALEOUT_BEGIN, SCALEOUT_END)
    if args.smoke:
        # The summary on stdout (CI log).
        print(text.split("## Scenarios")[0])
    log(f"report: {out}")
    log(f"{len(suite.failures)} failure(s) in {elapsed:.0f} s")
    for key, msg in suite.failures:
        log(f"  {key}: {msg}")
    suite.commands_log.close()
    if suite.failures or args.workdir:
        log(f"logs, configs and outputs kept in {suite.workdir}")
    else:
        shutil.rmtree(suite.workdir, ignore_errors=True)
    sys.exit(1 if suite.failures else 0)


if __name__ == "__main__":
    main()
