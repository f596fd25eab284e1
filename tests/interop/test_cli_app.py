"""`ferrule consume` and `ferrule command` (issue 12): the CLI as an application of a running
platform, against stock devices (mosquitto_pub, paho-mqtt)."""
import json
import subprocess
import time

from conftest import BIN, USERS
from registry_client import Registry
from test_adapters import mqtt_port, run
from test_commands import MqttDevice


def cli(p, *args, **kwargs):
    user, password = USERS["t1"]
    conn = ["--amqp", p.listeners["amqp"], "--user", user.split("@")[0], "--password", password]
    return [str(BIN), *args, *conn]


def test_consume_prints_telemetry_and_events_as_json_lines(platform):
    p = platform
    reg = Registry(p.registry_url, p.registry_token)
    reg.tenant("t1").device("t1", "d1", password="pw")
    consumer = subprocess.Popen(cli(p, "consume", "telemetry", "t1", "--count", "2", "--timeout", "20"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 10
        line = consumer.stderr.readline()
        assert "receiving from telemetry/t1" in line, line
        for body in ("first", '{"temp": 5}'):
            res = run(["mosquitto_pub", "-h", "127.0.0.1", "-p", mqtt_port(p), "-u", "d1@t1", "-P", "pw",
                       "-q", "1", "-t", "telemetry", "-m", body])
            assert res.returncode == 0, res
        out, err = consumer.communicate(timeout=max(1, deadline - time.time() + 10))
    finally:
        consumer.kill()
    assert consumer.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [m["payload"] for m in lines] == ["first", '{"temp": 5}'], lines
    assert all(m["properties"]["device_id"] == "d1" and m["tenant_id"] == "t1" for m in lines), lines
    assert lines[0]["properties"]["orig_adapter"] == "hono-mqtt"

    table = subprocess.Popen(cli(p, "consume", "event", "t1", "--format", "table", "--count", "10",
                                 "--timeout", "3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "receiving from event/t1" in table.stderr.readline()
        res = run(["mosquitto_pub", "-h", "127.0.0.1", "-p", mqtt_port(p), "-u", "d1@t1", "-P", "pw",
                   "-q", "1", "-t", "event", "-m", "an event"])
        assert res.returncode == 0, res
        out, err = table.communicate(timeout=20)
    finally:
        table.kill()
    rows = [r for r in out.splitlines() if "an event" in r]
    assert rows and rows[0].split()[0] == "d1" and "hono-mqtt" in rows[0], out


def test_command_request_response_and_one_way(platform):
    p = platform
    reg = Registry(p.registry_url, p.registry_token)
    reg.tenant("t1").device("t1", "d1", password="pw").device("t1", "away", password="pw")
    device = MqttDevice(p, "d1@t1", "pw", "command///req/#")
    try:
        res = subprocess.run(cli(p, "command", "t1", "d1", "setVolume", "--data", '{"level": 7}', "--timeout", "10"),
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        answer = json.loads(res.stdout)
        assert answer["status"] == 200 and answer["payload"] == 're: {"level": 7}', answer
        assert device.received[-1][0].endswith("/setVolume")

        res = subprocess.run(cli(p, "command", "t1", "d1", "reboot", "--one-way"),
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0 and json.loads(res.stdout) == {"outcome": "accepted"}, res
        deadline = time.time() + 5
        while not device.received[-1][0].endswith("/reboot") and time.time() < deadline:
            time.sleep(0.05)
        assert device.received[-1][0] == "command///req//reboot"

        # A device that is not connected: the platform releases the command, exit 1.
        res = subprocess.run(cli(p, "command", "t1", "away", "ping", "--timeout", "3"),
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 1 and "released" in res.stdout + res.stderr, res
    finally:
        device.close()


def test_help_has_examples():
    res = subprocess.run([str(BIN), "command", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "ferrule command my-tenant my-device setVolume" in res.stdout, res.stdout
    res = subprocess.run([str(BIN), "consume", "--help"], capture_output=True, text=True)
    assert "ferrule consume telemetry my-tenant" in res.stdout, res.stdout
