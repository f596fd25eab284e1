"""Metrics and health endpoints."""
import urllib.request

from amqp_client import connect, message


def get(p, path):
    try:
        with urllib.request.urlopen(f"http://{p.listeners['ops']}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text, name, **labels):
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_health_and_queue_metrics(platform):
    assert get(platform, "/health/live") == (200, "live\n")
    assert get(platform, "/health/ready") == (200, "ready\n")
    conn = connect(platform.url("t1"))
    sender = conn.create_sender("event/t1", name="m")
    for i in range(7):
        sender.send(message(i, durable=True))
    receiver = conn.create_receiver("event/t1", name="r")
    for _ in range(3):
        receiver.receive(timeout=5)
        receiver.accept()
    conn.close()
    import time
    time.sleep(0.3)
    status, text = get(platform, "/metrics")
    assert status == 200
    assert metric(text, "ferrule_queue_enqueued_total", address="event/t1") == 7
    assert metric(text, "ferrule_queue_acknowledged_total", address="event/t1") == 3
    assert metric(text, "ferrule_queue_depth", address="event/t1") == 4
    assert get(platform, "/nope")[0] == 404


def test_metrics_match_a_scripted_mixed_workload(platform):
    import subprocess
    import time

    import paho.mqtt.client as paho

    from amqp_client import Collector
    from registry_client import Registry

    p = platform
    reg = Registry(p.registry_url, p.registry_token)
    reg.tenant("t1").device("t1", "d1", password="pw1")
    reg.tenant("t2").device("t2", "d2", password="pw2")
    app = Collector(p.url("t1"), "telemetry/t1", credit=50)
    app.start()
    http = p.listeners["http"]

    def curl(path, user, *headers):
        cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", user, "-H", "content-type: text/plain",
               "--data-binary", "x", f"http://{http}{path}"]
        for h in headers:
            cmd += ["-H", h]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout

    assert [curl("/telemetry", "d1@t1:pw1", "QoS-Level: 1") for _ in range(5)] == ["202"] * 5
    assert [curl("/telemetry", "d2@t2:pw2", "QoS-Level: 1") for _ in range(2)] == ["503"] * 2  # nobody consumes t2
    assert [curl("/event", "d1@t1:pw1") for _ in range(3)] == ["202"] * 3
    assert curl("/telemetry", "d1@t1:wrong") == "401"
    port = p.listeners["mqtt"].rsplit(":", 1)[1]
    for i in range(4):
        res = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-u", "d1@t1", "-P", "pw1", "-q", "1",
                              "-t", "telemetry", "-m", f"m{i}"], capture_output=True, text=True, timeout=20)
        assert res.returncode == 0, res.stderr
    # QoS 0 to a tenant nobody consumes: the device is fine (at most once), the metric says dropped.
    for i in range(3):
        res = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-u", "d2@t2", "-P", "pw2", "-q", "0",
                              "-t", "telemetry", "-m", f"q{i}"], capture_output=True, text=True, timeout=20)
        assert res.returncode == 0, res.stderr
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="metrics-dev")
    client.username_pw_set("d1@t1", "pw1")
    client.connect("127.0.0.1", int(port))
    client.loop_start()
    time.sleep(0.5)

    status, text = get(p, "/metrics")
    assert status == 200
    m = lambda name, **labels: metric(text, name, **labels)  # noqa: E731
    total = "ferrule_adapter_messages_total"
    assert m(total, adapter="hono-http", tenant="t1", endpoint="telemetry", qos="1", outcome="accepted") == 5
    assert m(total, adapter="hono-http", tenant="t2", endpoint="telemetry", qos="1", outcome="no_consumer") == 2
    assert m(total, adapter="hono-http", tenant="t1", endpoint="event", qos="1", outcome="accepted") == 3
    assert m(total, adapter="hono-mqtt", tenant="t1", endpoint="telemetry", qos="1", outcome="accepted") == 4
    assert m(total, adapter="hono-mqtt", tenant="t2", endpoint="telemetry", qos="0", outcome="dropped") == 3
    assert m(total, adapter="hono-mqtt", tenant="t2", endpoint="telemetry", qos="0", outcome="accepted") is None
    assert m("ferrule_adapter_message_duration_seconds_count", adapter="hono-http", endpoint="telemetry", qos="1",
             outcome="accepted") == 5
    assert m("ferrule_auth_attempts_total", type="hashed-password", outcome="bad_credentials") == 1
    assert m("ferrule_adapter_connections", adapter="hono-mqtt") == 1
    # 3 HTTP events + connected/disconnected events of the 4 one-shot MQTT devices + 1 connected
    assert m("ferrule_queue_enqueued_total", address="event/t1") >= 3 + 4
    assert len(app.messages) == 5 + 4
    client.disconnect()
    client.loop_stop()
    app.close()
