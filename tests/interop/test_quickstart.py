"""The README quick start as a new user meets it: `ferrule serve` with no configuration
file, then an application connects with the generated credentials."""
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

from proton import Message

from amqp_client import connect
from conftest import BIN


def test_serve_with_defaults_generates_credentials_and_works(tmp_path):
    data = tmp_path / "data"
    # Defaults everywhere except the ports (port 0: nothing else on the machine is disturbed).
    ports = {
        "FERRULE__MESSAGING__LISTEN": "127.0.0.1:0",
        "FERRULE__OPS__LISTEN": "127.0.0.1:0",
        "FERRULE__REGISTRY__LISTEN": "127.0.0.1:0",
        "FERRULE__ADAPTERS__HTTP__LISTEN": "127.0.0.1:0",
        "FERRULE__ADAPTERS__MQTT__LISTEN": "127.0.0.1:0",
        "FERRULE__ADAPTERS__COAP__LISTEN": "127.0.0.1:0",
        "FERRULE__ADAPTERS__COAP__LISTEN_DTLS": "127.0.0.1:0",
    }
    env = dict(os.environ, FERRULE__DATA_DIR=str(data), **ports)
    env.pop("FERRULE_CONFIG", None)
    log = open(tmp_path / "log", "wb")
    proc = subprocess.Popen([str(BIN), "serve"], env=env, stdout=log, stderr=log, cwd=tmp_path)
    try:
        deadline = time.time() + 30
        while not (data / "listeners.json").exists():
            assert proc.poll() is None, (tmp_path / "log").read_text()
            assert time.time() < deadline
            time.sleep(0.05)
        creds = dict(
            line.split("=", 1) for line in (data / "admin-credentials").read_text().splitlines() if "=" in line and not line.startswith("#")
        )
        assert creds["username"] == "admin@*"
        assert len(creds["password"]) >= 20
        assert oct((data / "admin-credentials").stat().st_mode & 0o777) == "0o600"
        addr = json.loads((data / "listeners.json").read_text())["amqp"]
        conn = connect(f"amqp://admin%40t1:{creds['password']}@{addr}")
        conn.create_sender("event/t1", name="s").send(Message(body="hello", durable=True))
        receiver = conn.create_receiver("event/t1", name="r")
        assert receiver.receive(timeout=5).body == "hello"
        receiver.accept()
        conn.close()
        # The generated operator token opens the management API; nothing else does.
        token = (data / "operator-token").read_text().strip()
        assert oct((data / "operator-token").stat().st_mode & 0o777) == "0o600"
        registry = json.loads((data / "listeners.json").read_text())["registry"]
        req = urllib.request.Request(f"http://{registry}/v1/tenants/qs", data=b"{}", method="POST",
                                     headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
        assert urllib.request.urlopen(req, timeout=5).status == 201
        req = urllib.request.Request(f"http://{registry}/v1/tenants/qs", headers={"authorization": "Bearer wrong-token-123456789"})
        try:
            urllib.request.urlopen(req, timeout=5)
            raise AssertionError("wrong token accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    assert code == 0, "graceful shutdown exits 0"
    text = (tmp_path / "log").read_text()
    assert "admin-credentials" in text, "the log says where the credentials are"
    assert creds["password"] not in text, "the password is never logged"
    assert token not in text, "the operator token is never logged"


def test_print_default_config_lists_every_section():
    out = subprocess.run([str(BIN), "config", "print-default"], check=True, capture_output=True, text=True).stdout
    for key in ["data_dir", "[log]", "[messaging]", "listen", "queue_max_depth", "[messaging.sasl]", "users"]:
        assert key in out


def test_bad_configuration_is_refused_with_the_key_named(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[messaging]\nqueue_max_depht = 5\n")
    res = subprocess.run([str(BIN), "config", "check", "--config", str(cfg)], capture_output=True, text=True)
    assert res.returncode != 0
    assert "queue_max_depht" in res.stderr
