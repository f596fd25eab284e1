"""Tenant resource limits enforced in process (issue 17), with stock clients: a tenant at
its `max-connections` gets CONNACK 5 (MQTT 3.1.1) / 0x97 quota exceeded (MQTT 5) from
mosquitto_pub while another tenant's devices keep flowing; the limit follows the registry
live and a closed connection gives its place back."""
import threading
import time

import paho.mqtt.client as paho

from amqp_client import Collector
from registry_client import Registry
from test_adapters import mqtt_port, run
from test_ops import get, metric


def hold(p, user, password):
    """A paho-mqtt (3.1.1) connection kept open; None if its CONNECT was refused."""
    result = {}
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"hold-{user}", protocol=paho.MQTTv311)
    client.username_pw_set(user, password)
    client.on_connect = lambda c, u, f, rc, props=None: result.setdefault("rc", rc)
    client.connect("127.0.0.1", int(mqtt_port(p)))
    client.loop_start()
    deadline = time.time() + 10
    while "rc" not in result and time.time() < deadline:
        time.sleep(0.02)
    if result.get("rc") is not None and not result["rc"].is_failure:
        return client
    client.loop_stop()
    return None


def publish(p, user, version, qos="0"):
    """mosquitto_pub of one telemetry message (QoS 0: nobody consumes tenant `small`'s)."""
    return run(["mosquitto_pub", "-V", version, "-h", "127.0.0.1", "-p", mqtt_port(p), "-u", user, "-P", "pw",
                "-t", "telemetry", "-m", "x", "-q", qos, "-d", "-i", f"pub-{user}-{version}"])


def test_a_tenant_at_its_connection_limit_is_refused_others_are_not(platform):
    p = platform
    reg = Registry(p.registry_url, p.registry_token)
    reg.call("POST", "/v1/tenants/small", {"resource-limits": {"max-connections": 2}})
    for device in ("s1", "s2", "s3", "s4"):
        reg.device("small", device, password="pw")
    reg.tenant("t1").device("t1", "d1", password="pw")
    telemetry = Collector(p.url("t1"), "telemetry/t1", name="t1-app")
    telemetry.start()

    held = [hold(p, "s1@small", "pw"), hold(p, "s2@small", "pw")]
    assert all(held), "two connections are within the limit"
    v3 = publish(p, "s3@small", "mqttv311")
    assert "CONNACK (5)" in v3.stdout + v3.stderr and v3.returncode == 5, v3
    v5 = publish(p, "s3@small", "mqttv5")
    assert "CONNACK (151)" in v5.stdout + v5.stderr, v5  # 0x97 quota exceeded
    # Another tenant is not affected.
    other = publish(p, "d1@t1", "mqttv311", qos="1")
    assert other.returncode == 0, other
    assert telemetry.next(timeout=10).body == b"x"

    # A closed connection gives its place back.
    held.pop(0).disconnect()
    deadline = time.time() + 5
    while (res := publish(p, "s3@small", "mqttv311")).returncode != 0 and time.time() < deadline:
        time.sleep(0.1)
    assert res.returncode == 0, res

    # The limit follows the registry: raised to 3, a third connection is let in, a fourth not.
    held.append(hold(p, "s3@small", "pw"))
    assert held[-1] is not None, "the second of two"
    reg.call("PUT", "/v1/tenants/small", {"resource-limits": {"max-connections": 3}})
    deadline = time.time() + 5
    while (third := hold(p, "s4@small", "pw")) is None and time.time() < deadline:
        time.sleep(0.1)
    assert third is not None, "limit raised to 3"
    held.append(third)
    v3 = publish(p, "s1@small", "mqttv311")
    assert v3.returncode == 5, v3

    _, text = get(p, "/metrics")
    refusals = metric(text, "ferrule_tenant_limit_refusals_total", tenant="small", limit="max_connections",
                      adapter="hono-mqtt")
    assert refusals is not None and refusals >= 3, refusals
    assert metric(text, "ferrule_tenant_limit_refusals_total", tenant="t1") is None
    for client in held:
        client.disconnect()
        client.loop_stop()
    telemetry.close()


class Subscriber:
    """A paho-mqtt device that only receives commands (it never publishes)."""

    def __init__(self, p, user, password, protocol):
        self.connected = threading.Event()
        self.gone = threading.Event()
        self.reason = None
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"sub-{user}", protocol=protocol)
        self.client.username_pw_set(user, password)
        self.client.on_connect = lambda c, u, f, rc, props=None: (
            c.subscribe("command///req/#", qos=1), self.connected.set())
        self.client.on_disconnect = self.on_disconnect
        self.client.connect("127.0.0.1", int(mqtt_port(p)))
        self.client.loop_start()
        assert self.connected.wait(10), "CONNACK"

    def on_disconnect(self, client, userdata, flags, reason_code, properties=None):
        self.reason = reason_code
        self.gone.set()

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def test_disabling_a_device_or_its_tenant_closes_its_open_connections(platform):
    """Sessions that only receive commands are closed once the registry no longer lets
    their device in: MQTT 5 gets DISCONNECT 0x98 (administrative action)."""
    p = platform
    reg = Registry(p.registry_url, p.registry_token)
    reg.tenant("t1").device("t1", "d1", password="pw").device("t1", "d2", password="pw")
    reg.tenant("t2").device("t2", "e1", password="pw")
    d1 = Subscriber(p, "d1@t1", "pw", paho.MQTTv5)
    d2 = Subscriber(p, "d2@t1", "pw", paho.MQTTv311)
    e1 = Subscriber(p, "e1@t2", "pw", paho.MQTTv5)

    started = time.time()
    reg.set_device_enabled("t1", "d1", False)
    assert d1.gone.wait(5), "the disabled device's connection is closed"
    assert d1.reason.value == 0x98, d1.reason
    assert time.time() - started < 2, "within the propagation bound"
    assert not d2.gone.is_set() and not e1.gone.is_set(), "only that device"

    reg.call("PUT", "/v1/tenants/t1", {"enabled": False})
    assert d2.gone.wait(5), "a disabled tenant's connections are closed"
    assert not e1.gone.is_set(), "not another tenant's"

    reg.call("DELETE", "/v1/tenants/t2")
    assert e1.gone.wait(5), "a deleted tenant's connections are closed"

    _, text = get(p, "/metrics")
    assert metric(text, "ferrule_connections_revoked_total", adapter="hono-mqtt") == 3
    for s in (d1, d2, e1):
        s.close()


RATES = """
[adapters]
max_messages_per_second_per_device = 3
max_messages_per_second_per_tenant = 5
"""


def curl_burst(p, user, n):
    """`n` HTTP events in one curl run (one connection, back to back): their status codes."""
    url = f"http://{p.listeners['http']}/event"
    args = ["curl", "-s", "-u", user, "-H", "content-type: text/plain", "--data-binary", "e",
            "-w", "%{http_code} %header{retry-after}\\n", "-o", "/dev/null"]
    for _ in range(n - 1):
        args += [url, "--next", "-s", "-u", user, "-H", "content-type: text/plain", "--data-binary", "e",
                 "-w", "%{http_code} %header{retry-after}\\n", "-o", "/dev/null"]
    res = run(args + [url])
    return [line.split() for line in res.stdout.splitlines()]


def test_message_rates_per_device_and_per_tenant(platform_factory):
    """Over `max_messages_per_second_per_device` a device gets HTTP 429 (Retry-After) and
    MQTT 5 PUBACK 0x97; over the tenant's rate the tenant's other devices do too; another
    tenant is not affected, and the allowance comes back a second later."""
    p = platform_factory(extra=RATES).start()
    reg = Registry(p.registry_url, p.registry_token)
    reg.tenant("t1").device("t1", "d1", password="pw").device("t1", "d2", password="pw")
    reg.tenant("t2").device("t2", "e1", password="pw")

    d1 = curl_burst(p, "d1@t1:pw", 8)
    ok = sum(1 for code, *_ in d1 if code == "202")
    refused = [rest for code, *rest in d1 if code == "429"]
    assert 3 <= ok <= 4 and len(refused) == 8 - ok, d1  # 3 at once, at most one refilled
    assert all(r == ["1"] for r in refused), d1  # Retry-After: 1

    d2 = curl_burst(p, "d2@t1:pw", 5)
    ok2 = sum(1 for code, *_ in d2 if code == "202")
    assert 5 - ok <= ok2 <= 5 - ok + 1 and ok2 < 3, (d1, d2)  # what is left of the tenant's 5

    e1 = curl_burst(p, "e1@t2:pw", 3)
    assert [code for code, *_ in e1] == ["202"] * 3, e1

    # MQTT 5: PUBACK 0x97 over the device's rate, on a connection that stays open.
    time.sleep(1.2)
    acks = {}
    done = threading.Event()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="rated", protocol=paho.MQTTv5)
    client.username_pw_set("e1@t2", "pw")

    def on_publish(c, u, mid, reason_code, props):
        acks[mid] = reason_code.value
        if len(acks) == 6:
            done.set()

    client.on_publish = on_publish
    client.connect("127.0.0.1", int(mqtt_port(p)))
    client.loop_start()
    for _ in range(6):
        client.publish("event", b"m", qos=1)
    assert done.wait(10), acks
    codes = [acks[m] for m in sorted(acks)]
    assert codes.count(0) in (3, 4) and set(codes) <= {0, 0x97}, codes
    assert client.is_connected()
    client.disconnect()
    client.loop_stop()

    time.sleep(1.2)
    again = curl_burst(p, "d1@t1:pw", 1)
    assert again[0][0] == "202", again

    _, text = get(p, "/metrics")
    refusals = [metric(text, "ferrule_tenant_limit_refusals_total", tenant="t1", limit=limit, adapter="hono-http")
                for limit in ("device_rate", "tenant_rate")]
    assert refusals[0] >= len(refused) and refusals[1] >= 1, refusals
    assert sum(refusals) == len(refused) + (5 - ok2), (refusals, d1, d2)
    assert metric(text, "ferrule_tenant_limit_refusals_total", tenant="t2", limit="device_rate",
                  adapter="hono-mqtt") == codes.count(0x97)


def metered_tenant(reg, tenant, limits):
    """A tenant with `resource-limits` `limits` whose devices may also publish
    unauthenticated (plain CoAP) on every adapter."""
    body = {
        "resource-limits": limits,
        "adapters": [{"type": t, "enabled": True, "device-authentication-required": False}
                     for t in ("hono-http", "hono-mqtt", "hono-coap")],
    }
    method = "PUT" if tenant in getattr(reg, "_made", set()) else "POST"
    reg.call(method, f"/v1/tenants/{tenant}", body)
    reg._made = getattr(reg, "_made", set()) | {tenant}


def volume(max_bytes):
    return {"data-volume": {"effective-since": "2020-01-01T00:00:00Z", "max-bytes": max_bytes,
                            "period": {"mode": "days", "no-of-days": 30}}}


def mqtt5_connect(p, user, password="pw"):
    """A paho-mqtt MQTT 5 client: (client or None, the CONNACK reason code value)."""
    result = {}
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"v5-{user}-{time.time()}", protocol=paho.MQTTv5)
    client.username_pw_set(user, password)
    client.on_connect = lambda c, u, f, rc, props=None: result.setdefault("rc", rc.value)
    client.connect("127.0.0.1", int(mqtt_port(p)))
    client.loop_start()
    deadline = time.time() + 10
    while "rc" not in result and time.time() < deadline:
        time.sleep(0.02)
    if result.get("rc") == 0:
        return client, 0
    client.loop_stop()
    return None, result.get("rc")


def test_a_tenant_over_its_data_volume_is_refused_on_every_adapter(platform):
    """Hono's `resource-limits.data-volume`: payload bytes per period, counted in process
    over all adapters; over it HTTP 429, CoAP 4.29, MQTT 5 PUBACK 0x97 and CONNECT refused
    (CONNACK 5 / 0x97) until the period ends or the limit is raised."""
    p = platform
    reg = Registry(p.registry_url, p.registry_token)
    metered_tenant(reg, "metered", volume(100))
    reg.device("metered", "m1", password="pw")
    reg.tenant("t1").device("t1", "d1", password="pw")

    url = f"http://{p.listeners['http']}/event"
    codes = []
    for _ in range(3):
        res = run(["curl", "-s", "-u", "m1@metered:pw", "-H", "content-type: text/plain", "--data-binary", "x" * 40,
                   "-w", "%{http_code}", "-o", "/dev/null", url])
        codes.append(res.stdout)
    assert codes == ["202", "202", "429"], codes  # 80 bytes taken, 120 would be over 100
    coap = f"coap://{p.listeners['coap']}/event/metered/m1"
    ok = run(["coap-client-notls", "-m", "put", "-t", "text/plain", "-e", "y" * 20, coap])
    assert ok.returncode == 0 and "4.29" not in ok.stdout + ok.stderr, ok  # exactly 100
    over = run(["coap-client-notls", "-m", "put", "-t", "text/plain", "-e", "z", coap])
    assert "4.29" in over.stdout + over.stderr, over
    # Used up: MQTT connections are refused.
    v3 = publish(p, "m1@metered", "mqttv311", qos="1")
    assert "CONNACK (5)" in v3.stdout + v3.stderr, v3
    client, rc = mqtt5_connect(p, "m1@metered")
    assert client is None and rc == 0x97, rc
    # Another tenant is not affected.
    assert run(["curl", "-s", "-u", "d1@t1:pw", "-H", "content-type: text/plain", "--data-binary", "x" * 400,
                "-w", "%{http_code}", "-o", "/dev/null", url]).stdout == "202"

    # The limit follows the registry: raised to 1,000, 900 more bytes fit, then PUBACK 0x97.
    metered_tenant(reg, "metered", volume(1000))
    deadline = time.time() + 5
    while (connected := mqtt5_connect(p, "m1@metered"))[0] is None and time.time() < deadline:
        time.sleep(0.1)
    client = connected[0]
    assert client is not None, connected
    acks = {}
    client.on_publish = lambda c, u, mid, reason, props: acks.__setitem__(mid, reason.value)
    for size in (900, 1):
        client.publish("event", b"w" * size, qos=1)
    deadline = time.time() + 10
    while len(acks) < 2 and time.time() < deadline:
        time.sleep(0.02)
    assert [acks[m] for m in sorted(acks)] == [0, 0x97], acks
    client.disconnect()
    client.loop_stop()

    _, text = get(p, "/metrics")
    for adapter, n in (("hono-http", 1), ("hono-coap", 1), ("hono-mqtt", 3)):
        got = metric(text, "ferrule_tenant_limit_refusals_total", tenant="metered", limit="data_volume",
                     adapter=adapter)
        assert got == n, (adapter, got)


def test_a_tenant_over_its_connection_duration_is_refused(platform):
    """Hono's `resource-limits.connection-duration`: minutes its devices were connected per
    period, open connections included; at the limit a CONNECT gets CONNACK 5 / 0x97. (A
    limit of 0 minutes: the time accounting itself is unit-tested in door.rs.)"""
    p = platform
    reg = Registry(p.registry_url, p.registry_token)
    duration = lambda minutes: {"connection-duration": {  # noqa: E731
        "effective-since": "2020-01-01T00:00:00Z", "max-minutes": minutes, "period": {"mode": "monthly"}}}
    metered_tenant(reg, "timed", duration(0))
    reg.device("timed", "c1", password="pw")
    v3 = publish(p, "c1@timed", "mqttv311")
    assert "CONNACK (5)" in v3.stdout + v3.stderr, v3
    client, rc = mqtt5_connect(p, "c1@timed")
    assert client is None and rc == 0x97, rc
    # HTTP and CoAP hold no connection: not limited by it (as Hono).
    url = f"http://{p.listeners['http']}/event"
    assert run(["curl", "-s", "-u", "c1@timed:pw", "-H", "content-type: text/plain", "--data-binary", "x",
                "-w", "%{http_code}", "-o", "/dev/null", url]).stdout == "202"
    metered_tenant(reg, "timed", duration(60))
    # A CONNECT that races the registry change is still refused (and counted).
    refused_meanwhile = 0
    deadline = time.time() + 5
    while (connected := mqtt5_connect(p, "c1@timed"))[0] is None and time.time() < deadline:
        assert connected[1] == 0x97, connected
        refused_meanwhile += 1
        time.sleep(0.1)
    assert connected[0] is not None, connected
    connected[0].disconnect()
    connected[0].loop_stop()
    _, text = get(p, "/metrics")
    assert metric(text, "ferrule_tenant_limit_refusals_total", tenant="timed", limit="connection_duration",
                  adapter="hono-mqtt") == 2 + refused_meanwhile


def test_a_tenants_own_message_rates_from_the_registry(platform):
    """Ferrule's extension `resource-limits.ext.max-messages-per-second(-per-device)`: a
    tenant's own rates (the instance has none here), following the registry live."""
    p = platform
    reg = Registry(p.registry_url, p.registry_token)
    metered_tenant(reg, "paced", {"ext": {"max-messages-per-second-per-device": 2, "max-messages-per-second": 3}})
    reg.device("paced", "p1", password="pw").device("paced", "p2", password="pw")
    reg.tenant("t1").device("t1", "d1", password="pw")
    p1 = [code for code, *_ in curl_burst(p, "p1@paced:pw", 5)]
    assert p1.count("202") in (2, 3) and set(p1) <= {"202", "429"}, p1
    p2 = [code for code, *_ in curl_burst(p, "p2@paced:pw", 3)]
    assert p2.count("202") <= 3 - p1.count("202") + 1, (p1, p2)  # what is left of the tenant's 3
    assert [code for code, *_ in curl_burst(p, "d1@t1:pw", 5)] == ["202"] * 5, "t1 has no rates"
    status, body = reg.call("PUT", "/v1/tenants/paced", {"resource-limits": {"ext": {"max-messages-per-second": -1}}},
                            expect=(400,))
    assert "max-messages-per-second" in body["error"], body
    metered_tenant(reg, "paced", {})
    time.sleep(1.1)
    assert [code for code, *_ in curl_burst(p, "p1@paced:pw", 5)] == ["202"] * 5, "rates removed"
    _, text = get(p, "/metrics")
    refusals = [metric(text, "ferrule_tenant_limit_refusals_total", tenant="paced", limit=limit,
                       adapter="hono-http") or 0 for limit in ("device_rate", "tenant_rate")]
    assert refusals[0] >= p1.count("429") and sum(refusals) == p1.count("429") + p2.count("429"), (refusals, p1, p2)


def test_a_disabled_or_removed_credential_closes_the_connections_it_opened(platform):
    """A credential disabled (or removed) while its device stays enabled: the connections it
    authenticated are closed (MQTT 5: DISCONNECT 0x98); the device's connection through its
    other credential stays until that one goes too."""
    p = platform
    reg = Registry(p.registry_url, p.registry_token)
    reg.tenant("t1").device("t1", "d3")
    reg.call("PUT", "/v1/credentials/t1/d3", [
        {"type": "hashed-password", "auth-id": "d3", "secrets": [{"pwd-plain": "pw"}]},
        {"type": "hashed-password", "auth-id": "d3-alt", "secrets": [{"pwd-plain": "pw"}]},
    ])
    main = Subscriber(p, "d3@t1", "pw", paho.MQTTv5)
    alt = Subscriber(p, "d3-alt@t1", "pw", paho.MQTTv5)

    _, creds = reg.call("GET", "/v1/credentials/t1/d3")
    for c in creds:
        if c["auth-id"] == "d3":
            c["enabled"] = False
    started = time.time()
    reg.call("PUT", "/v1/credentials/t1/d3", creds)
    assert main.gone.wait(5), "the disabled credential's connection is closed"
    assert main.reason.value == 0x98, main.reason
    assert time.time() - started < 2, "within the propagation bound"
    time.sleep(0.5)
    assert not alt.gone.is_set(), "the device's other credential still holds"

    reg.call("PUT", "/v1/credentials/t1/d3", [])
    assert alt.gone.wait(5), "a removed credential's connection is closed"
    for s in (main, alt):
        s.close()
