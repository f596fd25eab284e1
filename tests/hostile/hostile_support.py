"""Support for the hostile-input tests: tests/interop's Platform (a real `ferrule serve`
on ephemeral loopback ports, its listeners read from listeners.json), the registered
device, and the health check every attack ends with (Target.assert_healthy).

The binary is $FERRULE_BIN, or target/debug/ferrule (as for tests/interop).
"""
import base64
import http.client
import importlib.util
import re
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

INTEROP = Path(__file__).resolve().parents[1] / "interop"
sys.path.insert(0, str(INTEROP))

from amqp_client import Collector  # noqa: E402  (tests/interop)
from registry_client import Registry  # noqa: E402  (tests/interop)

# tests/interop/conftest.py under its own name: a plain `import conftest` would find this file.
_spec = importlib.util.spec_from_file_location("interop_conftest", INTEROP / "conftest.py")
interop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(interop)
Platform, USERS, BIN = interop.Platform, interop.USERS, interop.BIN

TENANT = "t1"
DEVICE, DEVICE_PASSWORD = "d1", "pw1"
PSK = "coap-secret-key"  # the device's DTLS pre-shared key (identity d1@t1)
# How long the legitimate device's telemetry may take to reach the application afterwards.
DELIVERY_TIMEOUT = 5.0


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """VmRSS (or VmHWM, the peak) of `pid` in kB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def log_tail(platform, chars: int = 1500) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", platform.log_text())
    return text[-chars:]


def exit_description(rc: int) -> str:
    if rc is not None and rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


@dataclass
class Target:
    """The server under attack, with its pre-attack memory baseline."""

    platform: object
    registry: Registry
    baseline_rss_kb: int = 0

    @property
    def pid(self):
        return self.platform.proc.pid

    def addr(self, listener: str):
        """(host, port) of a listener named in listeners.json (coap, coaps, amqp, http, ...)."""
        host, port = self.platform.listeners[listener].rsplit(":", 1)
        return host, int(port)

    def rss_kb(self, field="VmRSS"):
        return rss_kb(self.pid, field)

    def assert_alive(self, attack: str):
        rc = self.platform.proc.poll()
        assert rc is None, (
            f"ferrule serve died during {attack}: {exit_description(rc)}\n--- log tail ---\n{log_tail(self.platform)}"
        )

    def telemetry_reaches_application(self, timeout: float = DELIVERY_TIMEOUT):
        """A registered device POSTs /telemetry over HTTP (basic auth); a python-qpid-proton
        receiver on telemetry/TENANT must get it within `timeout`."""
        collector = Collector(self.platform.url(TENANT), f"telemetry/{TENANT}")
        collector.start()
        try:
            body = f"health-{uuid.uuid4().hex}".encode()
            # 503: the receiver's link has no credit yet (it was just attached): retry.
            deadline = time.time() + timeout
            while (status := http_telemetry(self, body)) == 503 and time.time() < deadline:
                time.sleep(0.1)
            assert status == 202, f"legitimate HTTP telemetry answered {status}"
            expect_body(collector, body, timeout)
        finally:
            collector.close()

    def assert_healthy(self, attack: str, rss_bound_mb: int):
        """Everything each attack ends with: still running, still delivering, memory bounded."""
        self.assert_alive(attack)
        self.telemetry_reaches_application()
        self.assert_alive(attack)
        now, peak = self.rss_kb(), self.rss_kb("VmHWM")
        growth_mb = (now - self.baseline_rss_kb) / 1024
        assert growth_mb < rss_bound_mb, (
            f"RSS grew by {growth_mb:.0f} MB during {attack} (bound {rss_bound_mb} MB): "
            f"{self.baseline_rss_kb // 1024} MB before, {now // 1024} MB after, peak {peak // 1024} MB"
        )


def http_telemetry(target: Target, body: bytes, timeout: float = 10.0) -> int:
    host, port = target.addr("http")
    auth = base64.b64encode(f"{DEVICE}@{TENANT}:{DEVICE_PASSWORD}".encode()).decode()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/telemetry", body=body,
                     headers={"authorization": f"Basic {auth}", "content-type": "text/plain"})
        return conn.getresponse().status
    finally:
        conn.close()


def expect_body(collector: Collector, body: bytes, timeout: float):
    """Waits for a message with `body` on `collector` (others are skipped)."""
    deadline = time.time() + timeout
    seen = []
    while True:
        remaining = deadline - time.time()
        if remaining <= 0:
            raise AssertionError(f"telemetry {body!r} did not reach the application within {timeout} s (saw {seen[:5]})")
        try:
            msg = collector.next(timeout=remaining)
        except TimeoutError:
            continue
        got = msg.body
        got = got.encode() if isinstance(got, str) else bytes(got) if isinstance(got, (bytes, memoryview)) else repr(got).encode()
        if got == body:
            return msg
        seen.append(got[:40])
