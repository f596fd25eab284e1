"""Password verifiers that survive a restart (`[registry] verifier_key_file`): a device whose
password passed argon2 once reconnects after a restart without another argon2 run, a wrong
or changed password still goes through argon2, and the file holds nothing usable without
the key (see SECURITY.md, "Password verifiers")."""
import os
import stat
import subprocess
import urllib.request

from conftest import Platform
from registry_client import Registry


def checks(p):
    """ferrule_password_checks_total by method, from the ops endpoint."""
    with urllib.request.urlopen(f"http://{p.listeners['ops']}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {"hash": 0.0, "verifier": 0.0}
    for line in text.splitlines():
        if line.startswith("ferrule_password_checks_total{"):
            for method in out:
                if f'method="{method}"' in line:
                    out[method] = float(line.rsplit(" ", 1)[1])
    return out


def mqtt_connect(p, user, password):
    port = p.listeners["mqtt"].rsplit(":", 1)[1]
    res = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-u", user, "-P", password,
                          "-q", "0", "-t", "telemetry", "-m", "x"], capture_output=True, text=True, timeout=20)
    return res.returncode == 0


def with_key(tmp_path, key_path, name="data"):
    p = Platform(tmp_path / name)
    text = p.config_path.read_text().replace("[registry]\n", f'[registry]\nverifier_key_file = "{key_path}"\n', 1)
    p.config_path.write_text(text)
    return p


def test_a_restart_storm_skips_argon2_for_known_passwords_only(tmp_path):
    keys = tmp_path / "secrets"
    keys.mkdir()
    key = keys / "verifier-key"
    key.write_bytes(os.urandom(32))
    p = with_key(tmp_path, key).start()
    try:
        reg = Registry(p.registry_url, p.registry_token)
        reg.tenant("vt").device("vt", "d1", password="first-pw").device("vt", "d2", password="second-pw")
        assert mqtt_connect(p, "d1@vt", "first-pw")
        assert checks(p) == {"hash": 1, "verifier": 0}
    finally:
        assert p.stop() == 0
    store = p.data_dir / "password-verifiers"
    assert store.exists(), "written at shutdown"
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    raw = store.read_bytes()
    assert b"first-pw" not in raw and b"d1" in raw

    p.start()
    try:
        # A fresh process: the known password passes on its verifier, no argon2 run.
        assert mqtt_connect(p, "d1@vt", "first-pw")
        assert checks(p) == {"hash": 0, "verifier": 1}
        # A device never seen before, and a wrong password, still cost argon2.
        assert mqtt_connect(p, "d2@vt", "second-pw")
        assert not mqtt_connect(p, "d1@vt", "wrong-pw")
        assert checks(p) == {"hash": 2, "verifier": 1}
        # A new password makes the old verifier inert: the old password is refused, the new
        # one goes through argon2.
        reg = Registry(p.registry_url, p.registry_token)
        reg.call("PUT", "/v1/credentials/vt/d1", [{"type": "hashed-password", "auth-id": "d1",
                                                   "secrets": [{"pwd-plain": "third-pw"}]}])
        assert not mqtt_connect(p, "d1@vt", "first-pw")
        assert mqtt_connect(p, "d1@vt", "third-pw")
        assert checks(p)["verifier"] == 1
    finally:
        assert p.stop() == 0

    # Another key: the old verifiers are dropped, argon2 again.
    key.write_bytes(os.urandom(32))
    p.start()
    try:
        assert mqtt_connect(p, "d2@vt", "second-pw")
        assert checks(p) == {"hash": 1, "verifier": 0}
        assert "password verifiers ignored" in p.log_text()
    finally:
        p.stop()


def test_the_key_must_live_apart_from_the_data_and_be_long_enough(tmp_path):
    inside = tmp_path / "data" / "verifier-key"
    p = with_key(tmp_path, inside)
    inside.write_bytes(os.urandom(32))
    res = subprocess.run([str(__import__("conftest").BIN), "serve", "--config", str(p.config_path)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    assert "must not be inside the data directory" in res.stderr + res.stdout

    short = tmp_path / "short-key"
    short.write_bytes(b"0123456789")
    p = with_key(tmp_path, short, name="data2")
    res = subprocess.run([str(__import__("conftest").BIN), "serve", "--config", str(p.config_path)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    assert "at least 32 bytes" in res.stderr + res.stdout


def test_without_a_key_nothing_is_kept(platform):
    reg = Registry(platform.registry_url, platform.registry_token)
    reg.tenant("vn").device("vn", "d1", password="pw-one")
    assert mqtt_connect(platform, "d1@vn", "pw-one")
    assert checks(platform) == {"hash": 1, "verifier": 0}
    platform.stop()
    assert not (platform.data_dir / "password-verifiers").exists()
