"""Secrets at rest (issue 17): a data directory Ferrule creates is 0700, its stores and
generated secrets 0600, and `ferrule config check` prints no secret."""
import stat
import subprocess
import time

from conftest import BIN, CONFIG


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_data_directory_and_stores_are_private(tmp_path):
    data = tmp_path / "fresh" / "data"  # does not exist yet: ferrule creates it
    config = tmp_path / "ferrule.toml"
    config.write_text(CONFIG.format(data_dir=data, max_depth=1000, registry_token="operator-secret-token-0123"))
    proc = subprocess.Popen([str(BIN), "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 30
        while not (data / "listeners.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "ferrule did not start"
            time.sleep(0.05)
        assert mode(data) == 0o700, oct(mode(data))
        assert mode(data.parent) == 0o700, "parents it creates too"
        stores = [p for p in data.iterdir() if p.suffix == ".redb"]
        assert {p.name for p in stores} >= {"messaging.redb", "registry.redb"}, stores
        for store in stores:
            assert mode(store) == 0o600, f"{store.name}: {oct(mode(store))}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_config_check_redacts_every_secret(tmp_path):
    config = tmp_path / "ferrule.toml"
    text = CONFIG.format(data_dir=tmp_path / "data", max_depth=1000, registry_token="operator-secret-token-0123")
    text = text.replace("[registry]\n", '[registry]\nredis_url = "redis://app:redis-secret@127.0.0.1:6379/0"\n')
    config.write_text(text)
    out = subprocess.run([str(BIN), "config", "check", "--config", str(config)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    for secret in ("operator-secret-token-0123", "redis-secret", "secret-one", "secret-two"):
        assert secret not in out.stdout, f"{secret} printed"
    assert "redis://app:<redacted>@127.0.0.1:6379/0" in out.stdout
