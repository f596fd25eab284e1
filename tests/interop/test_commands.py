"""Command & control end to end: a python-qpid-proton application sends commands to
devices using paho-mqtt and curl, and gets their responses."""
import subprocess
import threading
import time
import uuid

import paho.mqtt.client as paho
import pytest
from proton import Message
from proton.utils import SendException

from amqp_client import Collector, connect
from registry_client import Registry

RELEASED, REJECTED = 0x26, 0x25


@pytest.fixture
def provisioned(platform):
    reg = Registry(platform.registry_url, platform.registry_token)
    reg.tenant("t1")
    reg.device("t1", "d1", password="pw1")
    reg.device("t1", "gw", password="gwpw")
    reg.device("t1", "child", via=["gw"])
    return platform


class MqttDevice:
    """A paho-mqtt device that answers every request with status 200 and echoes the body."""

    def __init__(self, platform, user, password, subscription, answer=True):
        self.received = []
        self.subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:8]}")
        self.client.username_pw_set(user, password)
        self.client.on_message = self.on_message
        self.client.on_subscribe = lambda *a, **k: self.subscribed.set()
        self.answer = answer
        self.subscription = subscription
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(subscription, qos=1)
        host, port = platform.listeners["mqtt"].rsplit(":", 1)
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert self.subscribed.wait(10), "SUBACK"

    def on_message(self, client, userdata, msg):
        self.received.append((msg.topic, msg.payload))
        parts = msg.topic.split("/")
        # command///req/REQ-ID/NAME or command//DEVICE/req/REQ-ID/NAME
        req_id = parts[4]
        if self.answer and req_id:
            client.publish(f"command/{parts[1]}/{parts[2]}/res/{req_id}/200", b"re: " + msg.payload, qos=1)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def command(device, name, body, reply_to=None, msg_id=None, **props):
    return Message(address=f"command/t1/{device}", subject=name, body=body, reply_to=reply_to, id=msg_id,
                   properties=props or None)


class App:
    """The application: a sender of commands to tenant t1 and, with `reply_to`, a collector of
    the responses there."""

    def __init__(self, platform, reply_to=None):
        self.reply_to = reply_to
        self.replies = None
        if reply_to:
            self.replies = Collector(platform.url("t1"), reply_to, name="replies")
            self.replies.start()
        self.conn = connect(platform.url("t1"))
        self.sender = self.conn.create_sender("command/t1", name="commands")

    def request(self, device, name, body, msg_id):
        """Sends a request-response command answered on `reply_to`."""
        self.sender.send(command(device, name, body, reply_to=self.reply_to, msg_id=msg_id))

    def request_when_taken(self, device, name, body, msg_id, timeout, who):
        """Retries the request until a polling device takes it (until then it is released)."""
        deadline = time.time() + timeout
        while True:
            try:
                return self.request(device, name, body, msg_id)
            except SendException:
                assert time.time() < deadline, f"the polling {who} never took the command"
                time.sleep(0.2)

    def close(self):
        self.conn.close()
        if self.replies:
            self.replies.close()


@pytest.fixture
def app(provisioned):
    """An App with responses to `command_response/t1/app-1`."""
    app = App(provisioned, reply_to="command_response/t1/app-1")
    yield app
    app.close()


def test_request_response_and_one_way_to_an_mqtt_device(provisioned, app):
    device = MqttDevice(provisioned, "d1@t1", "pw1", "command///req/#")
    for i in range(3):
        mid = f"req-{i}-{uuid.uuid4()}"
        app.request("d1", "setVolume", f"v{i}".encode(), mid)
        reply = app.replies.next(timeout=10)
        assert reply.correlation_id == mid
        assert reply.properties["status"] == 200
        assert bytes(reply.body) == f"re: v{i}".encode()
    app.sender.send(command("d1", "reboot", b""))  # one-way: accepted once the device has it
    deadline = time.time() + 5
    while not any(t.endswith("/reboot") for t, _ in device.received) and time.time() < deadline:
        time.sleep(0.05)
    one_way = [t for t, _ in device.received if t.endswith("/reboot")]
    assert one_way == ["command///req//reboot"]
    assert device.received[0][0].startswith("command///req/") and device.received[0][0].endswith("/setVolume")
    device.close()


def test_gateway_subscribed_for_all_its_devices(provisioned, app):
    gw = MqttDevice(provisioned, "gw@t1", "gwpw", "command//+/req/#")
    app.request("child", "open", b"door", "gw-1")
    reply = app.replies.next(timeout=10)
    assert reply.correlation_id == "gw-1" and reply.properties["status"] == 200
    assert gw.received[0][0].startswith("command//child/req/")
    # d1 does not list gw in `via`: nobody may take the command.
    with pytest.raises(SendException) as err:
        app.sender.send(command("d1", "open", b"x"))
    assert err.value.state == RELEASED
    gw.close()


def test_outcomes_released_and_rejected(provisioned):
    app = App(provisioned)
    sender = app.sender
    with pytest.raises(SendException) as err:
        sender.send(command("d1", "ping", b"x"))  # not connected
    assert err.value.state == RELEASED
    with pytest.raises(SendException) as err:
        sender.send(Message(address="command/t1/d1", body=b"no subject"))
    assert err.value.state == REJECTED
    with pytest.raises(SendException) as err:
        sender.send(Message(address="command/t2/d1", subject="x", body=b"foreign"))
    assert err.value.state == REJECTED
    app.close()


def test_curl_device_long_polls_for_a_command(provisioned, app):
    p = provisioned
    http = p.listeners["http"]
    poll = subprocess.Popen(
        ["curl", "-s", "-i", "-u", "d1@t1:pw1", "-H", "content-type: text/plain", "-H", "hono-ttd: 10",
         "--data-binary", "21.5", "-H", "QoS-Level: 0", f"http://{http}/event"],
        stdout=subprocess.PIPE, text=True)
    # The device's event goes first; then it waits for a command.
    events = Collector(p.url("t1"), "event/t1", name="events")
    events.start()
    app.request_when_taken("d1", "setTemp", b"22", "http-1", timeout=10, who="device")
    out = poll.communicate(timeout=15)[0]
    head, _, body = out.partition("\n\n")  # text mode turned CRLF into LF
    assert head.startswith("HTTP/1.1 200"), out
    headers = {k.lower(): v.strip() for k, v in (l.split(":", 1) for l in head.splitlines()[1:] if ":" in l)}
    assert headers["hono-command"] == "setTemp" and body == "22", repr(out)
    req_id = headers["hono-cmd-req-id"]
    res = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", "d1@t1:pw1",
                          "-H", "content-type: text/plain", "--data-binary", "ok",
                          f"http://{http}/command/res/{req_id}?hono-cmd-status=200"],
                         capture_output=True, text=True, timeout=15)
    reply = app.replies.next(timeout=10)
    assert reply.correlation_id == "http-1" and reply.properties["status"] == 200
    assert res.stdout == "202"
    events.close()


def test_deferred_command_survives_restart_and_expires(provisioned):
    p = provisioned
    app = App(p)
    app.sender.send(command("d1", "later", b"keep me", **{"x-ferrule-defer-ttl": 60}))  # accepted: stored
    app.sender.send(command("d1", "expiring", b"too late", **{"x-ferrule-defer-ttl": 1}))
    app.close()
    assert p.stop() == 0
    p.start()
    time.sleep(5)  # the device comes back 5 s later; by then the second command's TTL has passed
    device = MqttDevice(p, "d1@t1", "pw1", "command///req/#", answer=False)
    deadline = time.time() + 10
    while not device.received and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert [t.rsplit("/", 1)[1] for t, _ in device.received] == ["later"]
    assert device.received[0][1] == b"keep me"
    device.close()


def coap_client(p, args, path, out):
    return ["coap-client-openssl", "-B", "30", "-v", "7", "-o", str(out), "-u", "d1@t1", "-k", "coap-secret-key",
            *args, f"coaps://{p.listeners['coaps']}{path}"]


def test_coap_device_waits_for_a_command_with_hono_ttd(provisioned, app, tmp_path):
    p = provisioned
    Registry(p.registry_url, p.registry_token).device("t1", "c1", psk="coap-secret-key")
    events = Collector(p.url("t1"), "event/t1", name="events")
    events.start()
    args = lambda cmd: [a.replace("d1@t1", "c1@t1") for a in cmd]  # noqa: E731
    poll = subprocess.Popen(args(coap_client(p, ["-m", "post", "-t", "0", "-e", "21.5"], "/e?hono-ttd=10", tmp_path / "cmd")),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    app.request_when_taken("c1", "setLed", b"on", "coap-1", timeout=15, who="CoAP device")
    log = poll.communicate(timeout=40)[0]
    assert (tmp_path / "cmd").read_text() == "on", log
    line = [l for l in log.splitlines() if "Location-Query" in l][-1]
    assert "hono-command=setLed" in line, line
    req_id = [seg.split(",")[0].split(" ")[0].rstrip("]") for seg in line.split("Location-Path:")[1:]][-1]
    res = subprocess.run(args(coap_client(p, ["-m", "post", "-t", "0", "-e", "done"],
                                          f"/command_response/{req_id}?hono-cmd-status=200", tmp_path / "res")),
                         capture_output=True, text=True, timeout=40)
    reply = app.replies.next(timeout=10)
    assert reply.correlation_id == "coap-1" and reply.properties["status"] == 200, res.stdout
    events.close()


def test_a_forged_response_from_another_device_is_refused(provisioned, app):
    """Request ids are sealed for the device the command went to: d2 of the same tenant,
    knowing d1's request id, is refused over HTTP (403) and MQTT 5 (PUBACK 0x87), the
    application never sees its answer, and d1's genuine answer still arrives."""
    p = provisioned
    Registry(p.registry_url, p.registry_token).device("t1", "d2", password="pw2")
    device = MqttDevice(p, "d1@t1", "pw1", "command///req/#", answer=False)
    app.request("d1", "unlock", b"door", "genuine-1")
    deadline = time.time() + 10
    while not device.received and time.time() < deadline:
        time.sleep(0.05)
    topic = device.received[0][0]
    req_id = topic.split("/")[4]

    http = p.listeners["http"]
    forged = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "-u", "d2@t1:pw2", "-H", "content-type: text/plain",
                             "--data-binary", "forged", f"http://{http}/command/res/{req_id}?hono-cmd-status=200"],
                            capture_output=True, text=True, timeout=15)
    body, _, code = forged.stdout.rpartition("\n")
    assert code == "403", forged.stdout
    assert "not sent to this device" in body, body

    acks = {}
    acked = threading.Event()
    forger = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="forger", protocol=paho.MQTTv5)
    forger.username_pw_set("d2@t1", "pw2")

    def on_publish(client, userdata, mid, reason_code, properties):
        acks[mid] = reason_code.value
        acked.set()

    forger.on_publish = on_publish
    host, port = p.listeners["mqtt"].rsplit(":", 1)
    forger.connect(host, int(port))
    forger.loop_start()
    info = forger.publish(f"command///res/{req_id}/200", b"forged", qos=1)
    assert acked.wait(10), "PUBACK"
    assert acks[info.mid] == 0x87, acks  # not authorized
    forger.disconnect()
    forger.loop_stop()

    with pytest.raises(TimeoutError):
        app.replies.next(timeout=1)
    device.client.publish(f"command///res/{req_id}/200", b"opened", qos=1)
    reply = app.replies.next(timeout=10)
    assert reply.correlation_id == "genuine-1" and bytes(reply.body) == b"opened"
    assert reply.properties["device_id"] == "d1"
    device.close()

    from test_ops import get, metric
    _, text = get(p, "/metrics")
    assert metric(text, "ferrule_command_responses_refused_total", tenant="t1", reason="not_issued_to_device") == 2


def test_no_command_reaches_a_disabled_or_unknown_device(provisioned):
    """A device disabled while its command subscription is open gets no more commands
    (the application's command is rejected with amqp:not-found), and nothing is deferred
    for a device that does not exist."""
    p = provisioned
    reg = Registry(p.registry_url, p.registry_token)
    device = MqttDevice(p, "d1@t1", "pw1", "command///req/#", answer=False)
    app = App(p)
    app.sender.send(command("d1", "first", b"1"))  # accepted: the device has it
    reg.set_device_enabled("t1", "d1", False)
    time.sleep(0.5)  # the registry's change reaches the look-up caches
    with pytest.raises(SendException) as err:
        app.sender.send(command("d1", "second", b"2"))
    assert err.value.state == REJECTED
    with pytest.raises(SendException) as err:
        app.sender.send(command("nobody", "later", b"x", **{"x-ferrule-defer-ttl": 60}))
    assert err.value.state == REJECTED
    time.sleep(0.3)
    assert [t.rsplit("/", 1)[1] for t, _ in device.received] == ["first"]
    device.close()
    app.close()
