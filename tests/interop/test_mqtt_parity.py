"""MQTT as Hono 2.7 devices expect it (issue 12), with stock clients: a Will, a
persistent session (clean-session 0) and retained publishes are accepted; `retain` reaches
a python-qpid-proton application as the annotation `x-opt-retain`. Beyond Hono: the Will
is published as the device's event (or telemetry) when its connection is lost, not after a
DISCONNECT."""
import socket
import time

import paho.mqtt.client as paho

from amqp_client import Collector
from registry_client import Registry
from test_adapters import mqtt_port, run

CONNECTION_EVENT = "application/vnd.eclipse-hono-dc-notification+json"
EMPTY_NOTIFICATION = "application/vnd.eclipse-hono-empty-notification"


def device_messages(collector, n, timeout=10):
    """The next `n` messages that are not connection events or ttd notifications."""
    out = []
    deadline = time.time() + timeout
    while len(out) < n:
        msg = collector.next(timeout=max(0.1, deadline - time.time()))
        if msg.content_type not in (CONNECTION_EVENT, EMPTY_NOTIFICATION):
            out.append(msg)
    return out


def setup(p):
    reg = Registry(p.registry_url, p.registry_token)
    reg.tenant("t1").device("t1", "d1", password="pw")
    return reg


def mosquitto(p, *args, version="mqttv311"):
    return run(["mosquitto_pub", "-V", version, "-h", "127.0.0.1", "-p", mqtt_port(p), "-u", "d1@t1", "-P", "pw",
                "-d", *args])


def test_will_persistent_session_and_retain_are_accepted(platform):
    p = platform
    setup(p)
    telemetry = Collector(p.url("t1"), "telemetry/t1", name="parity-app")
    telemetry.start()
    for version in ("mqttv311", "mqttv5"):
        with_will = mosquitto(p, "--will-topic", "event", "--will-payload", "bye", "-q", "1", "-t", "telemetry",
                              "-m", f"will-{version}", version=version)
        assert with_will.returncode == 0 and "received CONNACK (0)" in with_will.stdout + with_will.stderr, with_will
        persistent = mosquitto(p, "-c", "-i", f"client1-{version}", "-q", "1", "-t", "telemetry",
                               "-m", f"persistent-{version}", version=version)
        assert persistent.returncode == 0, persistent
        retained = mosquitto(p, "-r", "-q", "1", "-t", "telemetry", "-m", f"retained-{version}", version=version)
        assert retained.returncode == 0, retained
    msgs = device_messages(telemetry, 6)
    telemetry.close()
    by_body = {bytes(m.body).decode(): m for m in msgs}
    assert set(by_body) == {f"{kind}-{v}" for kind in ("will", "persistent", "retained") for v in ("mqttv311", "mqttv5")}
    for v in ("mqttv311", "mqttv5"):
        assert by_body[f"retained-{v}"].annotations.get("x-opt-retain") is True, by_body[f"retained-{v}"].annotations
        assert "x-opt-retain" not in by_body[f"persistent-{v}"].annotations
    # A clean DISCONNECT (mosquitto_pub ends with one): no Will was published.
    events = Collector(p.url("t1"), "event/t1", name="parity-events")
    events.start()
    time.sleep(1.0)
    events.close()
    assert [m for m in events.messages if m.content_type != CONNECTION_EVENT] == []


def test_a_lost_connection_publishes_the_will_as_the_devices_event(platform):
    p = platform
    setup(p)
    events = Collector(p.url("t1"), "event/t1", name="will-events")
    events.start()

    def connect(client_id, version):
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version)
        client.username_pw_set("d1@t1", "pw")
        client.will_set("event", payload=f"{client_id} is gone", qos=1)
        client.connect("127.0.0.1", int(mqtt_port(p)))
        client.loop_start()
        deadline = time.time() + 10
        while not client.is_connected() and time.time() < deadline:
            time.sleep(0.02)
        assert client.is_connected()
        return client

    for client_id, version in (("lost-v3", paho.MQTTv311), ("lost-v5", paho.MQTTv5)):
        client = connect(client_id, version)
        client.loop_stop()
        # Killed: the socket closes without DISCONNECT.
        client.socket().shutdown(socket.SHUT_RDWR)
        client.socket().close()
        started = time.time()
        (will,) = device_messages(events, 1, timeout=5)
        assert time.time() - started < 2, "the Will within 2 s"
        assert bytes(will.body) == f"{client_id} is gone".encode()
        assert will.properties["device_id"] == "d1" and will.properties["orig_adapter"] == "hono-mqtt"
        assert will.annotations["tenant_id"] == "t1"

    # A clean DISCONNECT discards the Will.
    client = connect("clean", paho.MQTTv311)
    client.disconnect()
    client.loop_stop()
    time.sleep(1.0)
    events.close()
    rest = [m for m in events.messages[-5:] if m.content_type != CONNECTION_EVENT and b"clean" in bytes(m.body)]
    assert rest == [], rest


def test_tenant_defaults_max_ttl_and_max_ttd_on_every_adapter(platform):
    """Hono's tenant `defaults` (ttl, content type, properties), `resource-limits.max-ttl`
    (clamp) and the adapter's `ext.max-ttd` (clamp), over MQTT, HTTP and CoAP; HTTP and CoAP
    uploads carry the device's `ttd` as Hono sets it."""
    p = platform
    reg = Registry(p.registry_url, p.registry_token)
    adapters = [{"type": t, "enabled": True, "device-authentication-required": False, "ext": {"max-ttd": 2}}
                for t in ("hono-http", "hono-mqtt", "hono-coap")]
    reg.call("POST", "/v1/tenants/t1", {
        "defaults": {"ttl": 30, "content-type": "application/x-default", "site": "plant-7"},
        "resource-limits": {"max-ttl": 10},
        "adapters": adapters,
    })
    reg.device("t1", "s1", password="pw")
    mq = run(["mosquitto_pub", "-h", "127.0.0.1", "-p", mqtt_port(p), "-u", "s1@t1", "-P", "pw",
              "-q", "1", "-t", "event", "-m", "from mqtt"])
    assert mq.returncode == 0, mq
    http = run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", "-u", "s1@t1:pw",
                "-H", "content-type: text/plain", "-H", "hono-ttl: 5", "-H", "hono-ttd: 30", "-H", "site: ignored",
                "--data-binary", "from http", f"http://{p.listeners['http']}/event"])
    code, took = http.stdout.split()
    assert code == "202" and 1.5 < float(took) < 10, http.stdout  # waited the clamped 2 s for a command
    coap = run(["coap-client-notls", "-m", "put", "-e", "from coap",
                f"coap://{p.listeners['coap']}/event/t1/s1?hono-ttd=30"])
    assert coap.returncode == 0, coap

    events = Collector(p.url("t1"), "event/t1", name="shaped-events")
    events.start()
    msgs = {bytes(m.body).decode(): m for m in device_messages(events, 3)}
    assert set(msgs) == {"from mqtt", "from http", "from coap"}, [(k, m.content_type) for k, m in msgs.items()]
    events.close()
    m = msgs["from mqtt"]
    assert m.content_type == "application/x-default" and m.properties["site"] == "plant-7", m
    assert abs(m.ttl - 10) < 0.01, m.ttl  # the default 30 s, cut to max-ttl
    assert "ttd" not in m.properties
    h = msgs["from http"]
    assert h.content_type == "text/plain" and abs(h.ttl - 5) < 0.01, h
    assert h.properties["site"] == "plant-7" and h.properties["ttd"] == 2, h.properties
    c = msgs["from coap"]
    assert c.properties["ttd"] == 2 and abs(c.ttl - 10) < 0.01, (c.properties, c.ttl)


def test_mqtt5_receive_maximum_covers_pahos_default_window(platform):
    """The CONNACK's Receive Maximum is what a connection may have in flight
    ([adapters.mqtt] max_in_flight, 32): paho's default of 20 QoS 1 publishes in flight
    fits (ntex's own 16 made a burst from paho end in DISCONNECT 0x93)."""
    import threading

    setup(platform)
    app = Collector(platform.url("t1"), "telemetry/t1", credit=100)
    app.start()
    connected, acked, props = threading.Event(), [], {}
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="burst5", protocol=paho.MQTTv5)
    client.username_pw_set("d1@t1", "pw")
    client.on_connect = lambda c, u, f, rc, p: (props.update(rc=rc, rm=getattr(p, "ReceiveMaximum", None)),
                                                 connected.set())
    client.on_publish = lambda c, u, mid, rc, p: acked.append(rc)
    disconnects = []
    client.on_disconnect = lambda c, u, f, rc, p: disconnects.append(rc)
    client.connect("127.0.0.1", int(mqtt_port(platform)))
    client.loop_start()
    try:
        assert connected.wait(10)
        assert props == {"rc": 0, "rm": 32}, props
        for i in range(20):
            client.publish("telemetry", f"m{i}".encode(), qos=1)
        deadline = time.time() + 15
        while len(acked) < 20 and time.time() < deadline and not disconnects:
            time.sleep(0.05)
        assert not disconnects, f"disconnected: {disconnects}"
        assert len(acked) == 20 and all(not rc.is_failure for rc in acked), acked
        assert len(device_messages(app, 20)) == 20
    finally:
        client.loop_stop()
        client.disconnect()
        app.close()
