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
