"""Device state API (issue 12): `GET /v1/state/TENANT/DEVICE` and `GET /v1/state/TENANT` show
whether a device is connected, through which adapter, since when, when it was last seen and
the gateway that last acted for it, within 1 s of the change, for devices using stock clients
(paho-mqtt, curl, coap-client); and commands go to the last-known gateway (Hono's rule)."""
import json
import time
import urllib.parse

import paho.mqtt.client as paho

from registry_client import Registry
from test_adapters import mqtt_port, run
from test_commands import App, MqttDevice, command


def state(reg, path, expect=(200,)):
    status, body = reg.call("GET", f"/v1/state/{path}", expect=expect)
    return body


def until(check, timeout=1.0):
    """Polls `check` until it holds; fails after `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.time() < deadline, "not within the time bound"
        time.sleep(0.05)


def test_connection_status_over_each_adapter(platform):
    p = platform
    reg = Registry(p.registry_url, p.registry_token)
    reg.tenant("t1", unauthenticated=True)
    reg.device("t1", "d1", password="pw").device("t1", "gw", password="gwpw").device("t1", "child", via=["gw"])

    assert state(reg, "t1/d1") == {"id": "d1", "connected": False}
    state(reg, "t1/nobody", expect=(404,))
    state(reg, "nosuchtenant", expect=(404,))

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="state-d1")
    client.username_pw_set("d1@t1", "pw")
    client.connect("127.0.0.1", int(mqtt_port(p)))
    client.loop_start()
    s = until(lambda: (s := state(reg, "t1/d1"))["connected"] and s)
    assert s["adapter"] == "hono-mqtt" and "connected-since" in s and "last-seen" in s, s
    listed = state(reg, "t1?" + urllib.parse.urlencode({"filterJson": json.dumps({"field": "/connected", "value": True})}))
    assert listed["total"] == 1 and listed["result"][0]["id"] == "d1", listed

    seen_connected = s["last-seen"]
    time.sleep(0.01)
    client.disconnect()
    client.loop_stop()
    s = until(lambda: not (s := state(reg, "t1/d1"))["connected"] and s)
    assert "connected-since" not in s and s["last-seen"] > seen_connected, s

    # HTTP through a gateway: last seen, and the gateway that acted for the device.
    res = run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", "gw@t1:gwpw", "-X", "PUT",
               "-H", "content-type: text/plain", "--data-binary", "via gw", f"http://{p.listeners['http']}/event/t1/child"])
    assert res.stdout == "202", res
    s = until(lambda: (s := state(reg, "t1/child")).get("adapter") == "hono-http" and s)
    assert s["last-known-gateway"] == "gw" and s["connected"] is False, s

    # CoAP (unauthenticated): the device itself; no gateway any more.
    res = run(["coap-client-notls", "-m", "put", "-t", "text/plain", "-e", "coap", f"coap://{p.listeners['coap']}/event/t1/child"])
    assert res.returncode == 0, res
    s = until(lambda: (s := state(reg, "t1/child")).get("adapter") == "hono-coap" and s)
    assert "last-known-gateway" not in s, s

    page = state(reg, "t1?pageSize=1")
    assert page["total"] == 2 and len(page["result"]) == 1, page


def test_commands_go_to_the_last_known_gateway(platform):
    p = platform
    reg = Registry(p.registry_url, p.registry_token)
    reg.tenant("t1")
    reg.device("t1", "gw1", password="pw").device("t1", "gw2", password="pw")
    reg.device("t1", "child", via=["gw1", "gw2"])
    gw1 = MqttDevice(p, "gw1@t1", "pw", "command//+/req/#", answer=False)
    gw2 = MqttDevice(p, "gw2@t1", "pw", "command//+/req/#", answer=False)
    gw1.name, gw2.name = "gw1", "gw2"
    app = App(p)
    try:
        for gateway, other in ((gw1, gw2), (gw2, gw1), (gw1, gw2)):
            info = gateway.client.publish("event//child", b"for child", qos=1)
            info.wait_for_publish(5)
            name = gateway.name
            until(lambda: state(reg, "t1/child").get("last-known-gateway") == name)
            before = (len(gateway.received), len(other.received))
            app.sender.send(command("child", "ping", "x"))
            until(lambda: len(gateway.received) == before[0] + 1, timeout=5)
            assert len(other.received) == before[1], "only the last-known gateway gets it"
            assert gateway.received[-1][0].startswith("command//child/req/")
    finally:
        app.close()
        gw1.close()
        gw2.close()


def test_deferred_command_lifecycle_is_visible_and_deletable(platform):
    """`GET /v1/commands/TENANT/DEVICE`: the device's deferred commands with their status
    (queued, delivered, expired, deleted); `DELETE` removes what is still queued."""
    p = platform
    reg = Registry(p.registry_url, p.registry_token)
    reg.tenant("t1")
    reg.device("t1", "d1", password="pw").device("t1", "d2", password="pw")
    app = App(p)
    try:
        app.sender.send(command("d1", "deliver-me", "a", msg_id="c-1", **{"x-ferrule-defer-ttl": 60}))
        app.sender.send(command("d1", "expire-me", "b", msg_id="c-2", **{"x-ferrule-defer-ttl": 1}))
        app.sender.send(command("d2", "delete-me", "c", msg_id="c-3", **{"x-ferrule-defer-ttl": 60}))

        def listed(device):
            _, body = reg.call("GET", f"/v1/commands/t1/{device}")
            return {c["id"]: c["status"] for c in body["result"]}

        assert listed("d1") == {"c-1": "queued", "c-2": "queued"}
        time.sleep(1.2)
        assert listed("d1") == {"c-1": "queued", "c-2": "expired"}
        device = MqttDevice(p, "d1@t1", "pw", "command///req/#", answer=False)
        try:
            until(lambda: len(device.received) == 1, timeout=5)
            assert device.received[0][0].endswith("/deliver-me"), device.received
            until(lambda: listed("d1") == {"c-1": "delivered", "c-2": "expired"}, timeout=5)
        finally:
            device.close()

        reg.call("DELETE", "/v1/commands/t1/d2", expect=(204,))
        assert listed("d2") == {"c-3": "deleted"}
        late = MqttDevice(p, "d2@t1", "pw", "command///req/#", answer=False)
        try:
            time.sleep(1.0)
            assert late.received == [], "a deleted command is not delivered"
        finally:
            late.close()
        reg.call("GET", "/v1/commands/t1/nobody", expect=(404,))
    finally:
        app.close()
