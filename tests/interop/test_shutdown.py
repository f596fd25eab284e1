"""Graceful shutdown: SIGTERM during a stream of QoS 1 events loses nothing that was
acknowledged, and the process exits 0 within the grace period."""
import signal
import threading
import time

import paho.mqtt.client as paho

from amqp_client import Collector
from registry_client import Registry


def test_sigterm_during_qos1_events_keeps_every_acknowledged_event(platform):
    p = platform
    Registry(p.registry_url, p.registry_token).tenant("t1").device("t1", "d1", password="pw1")
    acked, sent = set(), {}
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="sigterm-dev", protocol=paho.MQTTv311)
    client.username_pw_set("d1@t1", "pw1")
    client.max_inflight_messages_set(20)
    lock = threading.Lock()

    def on_publish(c, u, mid, rc=None, props=None):
        with lock:
            acked.add(sent.get(mid))

    connected = threading.Event()
    client.on_publish = on_publish
    client.on_connect = lambda c, u, f, rc, props=None: connected.set()
    host, port = p.listeners["mqtt"].rsplit(":", 1)
    client.connect(host, int(port))
    client.loop_start()
    assert connected.wait(10)
    stop = threading.Event()

    def publish():
        i = 0
        while not stop.is_set() and client.is_connected():
            with lock:  # record the mid before its PUBACK can be handled
                info = client.publish("event", f"ev-{i}".encode(), qos=1)
                sent[info.mid] = f"ev-{i}"
            i += 1
            time.sleep(0.002)

    t = threading.Thread(target=publish, daemon=True)
    t.start()
    time.sleep(1.5)
    started = time.time()
    p.proc.send_signal(signal.SIGTERM)
    code = p.proc.wait(timeout=30)
    stop.set()
    t.join(5)
    client.loop_stop()
    assert code == 0, p.log_text()[-2000:]
    assert time.time() - started < 12, "exits within the grace period"
    acked.discard(None)
    assert len(acked) >= 10, f"only {len(acked)} events were acknowledged before SIGTERM"

    p.start()
    events = Collector(p.url("t1"), "event/t1", credit=200)
    events.start()
    deadline = time.time() + 30
    while time.time() < deadline:
        got = {bytes(m.body).decode() for m in events.messages if m.content_type != "application/vnd.eclipse-hono-dc-notification+json"}
        if acked <= got:
            break
        time.sleep(0.2)
    events.close()
    missing = acked - got
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:5]}"
