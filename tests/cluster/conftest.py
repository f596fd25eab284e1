"""Scale-out test support: RabbitMQ and a Redis Cluster on private loopback ports
(tests/cluster/brokers.sh), and N `ferrule serve` instances in cluster mode over them.

The brokers are started once per test session and stopped by PID at the end; each test
uses its own tenants, so tests do not see each other's queues or registry entries.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "interop"))
BIN = Path(os.environ.get("FERRULE_BIN", ROOT / "target" / "debug" / "ferrule"))
BROKERS = HERE / "brokers.sh"

RABBIT_AMQP = "127.0.0.1:25681"
RABBIT_AMQPS = "localhost:25671"
RABBIT_HTTP = "127.0.0.1:25691"
REDIS_NODES = ["redis://127.0.0.1:27001/", "redis://127.0.0.1:27002/", "redis://127.0.0.1:27003/"]
TOKEN = "test-operator-token"
APP_PASSWORD = "app-secret"

BASE_CONFIG = """
data_dir = "{data_dir}"
[log]
level = "info"
[ops]
listen = "127.0.0.1:0"
[messaging]
listen = "127.0.0.1:0"
listen_tls = "127.0.0.1:0"
[messaging.sasl]
users = [{{ username = "app@*", password = "{app_password}" }}{more_users}]
[commands]
request_id_key = "cluster-test-request-id-key-0123456789"
[cluster]
instance_id = "{instance}"
peer_password = "cluster-test-peer-secret"
redis_urls = {redis}
roles = {roles}
{cluster_extra}
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
[adapters.coap]
listen = "127.0.0.1:0"
listen_dtls = "127.0.0.1:0"
"""

RABBIT_BACKEND = """
[messaging.backend]
kind = "amqp"
urls = ["amqp://{amqp}"]
username = "guest"
password = "guest"
addresses = "rabbitmq"
management_url = "http://{http}"
outcome_timeout = "5s"
"""


def brokers_command(*args, keep=False):
    """Runs tests/cluster/brokers.sh on the session's brokers (keep: start over their data)."""
    pki = Path(os.environ["FERRULE_CLUSTER_BASE"]) / "pki"
    env = {**os.environ, "BASE": os.environ["FERRULE_CLUSTER_BASE"], "KEEP": "1" if keep else "0",
           "RABBIT_TLS_DIR": str(pki) if pki.exists() else ""}
    subprocess.run([str(BROKERS), *args], check=True, timeout=180, env=env)


_brokers = brokers_command


@pytest.fixture(scope="session")
def brokers(tmp_path_factory):
    """RabbitMQ (1 node) and a 3-master Redis Cluster for the whole session."""
    missing = [c for c in ("redis-server", "redis-cli") if shutil.which(c) is None]
    if not Path("/usr/lib/rabbitmq").exists():
        missing.append("rabbitmq-server")
    if missing:
        pytest.fail(f"missing {missing}: run-tests.sh installs them")
    base = tmp_path_factory.mktemp("brokers")
    os.environ["FERRULE_CLUSTER_BASE"] = str(base)
    from tls_support import make_pki
    make_pki(base / "pki")  # RabbitMQ's TLS listener (CA, server certificate for localhost)
    _brokers("redis-start", "3", "0")
    try:
        _brokers("rabbit-start", "1")
    except Exception:
        _brokers("redis-stop", "3")
        raise
    yield
    _brokers("rabbit-stop", "1")
    _brokers("redis-stop", "3")


class Instance:
    """One `ferrule serve` in cluster mode."""

    def __init__(self, data_dir: Path, name: str, backend: str, prefix: str, roles=None, extra="", users=(),
                 registry_extra="", cluster_extra=""):
        self.data_dir = data_dir
        self.name = name
        self.prefix = prefix
        data_dir.mkdir(parents=True, exist_ok=True)
        roles = roles or ["devices", "applications", "management"]
        self.config_path = data_dir / "ferrule.toml"
        self.config_path.write_text(
            BASE_CONFIG.format(
                data_dir=data_dir,
                instance=name,
                redis=json.dumps(REDIS_NODES),
                roles=json.dumps(roles),
                prefix=prefix,
                token=TOKEN,
                app_password=APP_PASSWORD,
                more_users="".join(f', {{ username = "{u}", password = "{p}" }}' for u, p in users),
                registry_extra=registry_extra,
                cluster_extra=cluster_extra,
            )
            + backend
            + extra
        )
        self.log_path = data_dir / "ferrule.log"
        self.proc = None

    def start(self):
        listeners = self.data_dir / "listeners.json"
        if listeners.exists():
            listeners.unlink()
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(BIN), "serve", "--config", str(self.config_path)], stdout=self.log, stderr=self.log)
        deadline = time.time() + 30
        while not listeners.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_path.read_text()}")
            if time.time() > deadline:
                raise RuntimeError(f"{self.name} did not start within 30 s")
            time.sleep(0.05)
        self.listeners = json.loads(listeners.read_text())
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self):
        """SIGKILL: no chance to hand anything over."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def amqp_url(self, tenant):
        return f"amqp://app@{tenant}:{APP_PASSWORD}@{self.listeners['amqp']}"

    @property
    def registry_url(self):
        return f"http://{self.listeners['registry']}"

    @property
    def http(self):
        return self.listeners["http"]

    @property
    def mqtt_port(self):
        return self.listeners["mqtt"].rsplit(":", 1)[1]

    @property
    def coaps(self):
        return self.listeners["coaps"]

    def log_text(self):
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def cluster(brokers, tmp_path):
    """`cluster(n)` starts n instances over RabbitMQ and Redis Cluster; a fresh registry
    key prefix per test keeps tests apart."""
    started = []
    prefix = f"ferrule-test-{uuid.uuid4().hex[:8]}"

    def make(n=3, backend=None, roles=None, extra="", users=(), registry_extra="", cluster_extra=""):
        backend = backend if backend is not None else RABBIT_BACKEND.format(amqp=RABBIT_AMQP, http=RABBIT_HTTP)
        instances = []
        for _ in range(n):
            i = Instance(tmp_path / f"i{len(started) + 1}", f"i{len(started) + 1}", backend, prefix, roles, extra, users,
                         registry_extra, cluster_extra)
            started.append(i)
            instances.append(i.start())
        return instances

    yield make
    for i in started:
        i.stop()


def unique_tenant(prefix="t"):
    return f"{prefix}{uuid.uuid4().hex[:8]}"
