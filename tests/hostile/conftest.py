"""Fixtures of the hostile-input tests (helpers live in hostile_support.py)."""
import resource

import pytest

from hostile_support import BIN, DEVICE, DEVICE_PASSWORD, PSK, TENANT, Platform, Registry, Target


# Connection floods open thousands of sockets here and in the server (a child of this
# process, so it inherits the limit): raise the soft limit on open files to the hard one.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))


def pytest_configure(config):
    config.addinivalue_line("markers", "server_env(**vars): environment of the server under attack")


@pytest.fixture
def target(tmp_path, monkeypatch, request):
    """A fresh `ferrule serve` with tenant t1 and device d1 (password and PSK). It has
    already delivered one telemetry message end to end; the RSS baseline is taken after
    that, so the attack's growth is measured against a warmed-up server.

    RUST_BACKTRACE is pinned to 0 for the server: with RUST_BACKTRACE=1 (set in some
    shells and CI images) the first panic symbolises a backtrace from the debug binary's
    line tables, which alone adds about 190 MB of RSS and would make the memory bounds
    depend on the caller's environment. Panic messages are still logged."""
    if not BIN.exists():
        pytest.fail(f"ferrule binary not found at {BIN} (set FERRULE_BIN or build target/debug/ferrule)")
    monkeypatch.setenv("RUST_BACKTRACE", "0")
    marker = request.node.get_closest_marker("server_env")
    for key, value in (marker.kwargs if marker else {}).items():
        monkeypatch.setenv(key, value)
    platform = Platform(tmp_path / "data").start()
    try:
        registry = Registry(platform.registry_url, platform.registry_token)
        registry.tenant(TENANT, unauthenticated=True)
        registry.device(TENANT, DEVICE, password=DEVICE_PASSWORD, psk=PSK)
        t = Target(platform, registry)
        t.telemetry_reaches_application(timeout=10)
        t.baseline_rss_kb = t.rss_kb()
        yield t
    finally:
        if platform.proc.poll() is None:
            try:
                platform.stop()
            except Exception:
                platform.proc.kill()
                platform.proc.wait(10)
