"""Test support: starts real `ferrule serve` processes on ephemeral ports.

The binary is taken from $FERRULE_BIN, or target/debug/ferrule (built by `cargo build`
before pytest runs; see .ci/run).
"""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("FERRULE_BIN", ROOT / "target" / "debug" / "ferrule"))

USERS = {
    "t1": ("app@t1", "secret-one"),
    "t2": ("app@t2", "secret-two"),
}

CONFIG = """
data_dir = "{data_dir}"
[log]
level = "info"
[ops]
listen = "127.0.0.1:0"
[messaging]
listen = "127.0.0.1:0"
listen_tls = "127.0.0.1:0"
queue_max_depth = {max_depth}
expiry_check_interval = "200ms"
addresses = [
  {{ pattern = "broadcast/*", type = "multicast" }},
  {{ pattern = "news/*", type = "topic" }},
  {{ pattern = "service/*", type = "anycast" }},
]
[messaging.sasl]
users = [
  {{ username = "app@t1", password = "secret-one" }},
  {{ username = "app@t2", password = "secret-two" }},
]
[registry]
listen = "127.0.0.1:0"
auth_tokens = ["{registry_token}"]
[adapters.http]
listen = "127.0.0.1:0"
listen_tls = "127.0.0.1:0"
allow_unauthenticated = true
[adapters.mqtt]
listen = "127.0.0.1:0"
listen_tls = "127.0.0.1:0"
allow_unauthenticated = true
[adapters.coap]
listen = "127.0.0.1:0"
listen_dtls = "127.0.0.1:0"
allow_unauthenticated = true
"""

REGISTRY_TOKEN = "test-operator-token"


class Platform:
    """One `ferrule serve` process over a data directory that outlives restarts."""

    def __init__(self, data_dir: Path, max_depth: int = 100000, extra: str = ""):
        self.data_dir = data_dir
        self.config_path = data_dir / "ferrule.toml"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            CONFIG.format(data_dir=data_dir, max_depth=max_depth, registry_token=REGISTRY_TOKEN) + extra
        )
        self.registry_token = REGISTRY_TOKEN
        self.proc = None
        self.log_path = data_dir / "ferrule.log"

    def start(self):
        listeners = self.data_dir / "listeners.json"
        if listeners.exists():
            listeners.unlink()
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--config", str(self.config_path)],
            stdout=self.log,
            stderr=self.log,
        )
        deadline = time.time() + 30
        while not listeners.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"ferrule exited with {self.proc.returncode}: {self.log_path.read_text()}")
            if time.time() > deadline:
                raise RuntimeError("ferrule did not start within 30 s")
            time.sleep(0.05)
        self.listeners = json.loads(listeners.read_text())
        return self

    def url(self, tenant="t1", password=None):
        user, secret = USERS[tenant]
        host, port = self.listeners["amqp"].rsplit(":", 1)
        return f"amqp://{user}:{password or secret}@{host}:{port}"

    @property
    def registry_url(self):
        return f"http://{self.listeners['registry']}"

    @property
    def address(self):
        return self.listeners["amqp"]

    def kill(self):
        """SIGKILL: no chance to flush anything."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        return self.proc.returncode if self.proc else None

    def log_text(self):
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def platform(tmp_path):
    p = Platform(tmp_path / "data").start()
    yield p
    p.stop()


@pytest.fixture
def platform_factory(tmp_path):
    started = []

    def make(**kwargs):
        p = Platform(tmp_path / f"data{len(started)}", **kwargs)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()
