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


def test_request_response_and_one_way_to_an_mqtt_device(provisioned):
    p = provisioned
    device = MqttDevice(p, "d1@t1", "pw1", "command///req/#")
    replies = Collector(p.url("t1"), "command_response/t1/app-1", name="replies")
    replies.start()
    conn = connect(p.url("t1"))
    sender = conn.create_sender("command/t1", name="commands")
    for i in range(3):
        mid = f"req-{i}-{uuid.uuid4()}"
        sender.send(command("d1", "setVolume", f"v{i}".encode(), reply_to="command_response/t1/app-1", msg_id=mid))
        reply = replies.next(timeout=10)
        assert reply.correlation_id == mid
        assert reply.properties["status"] == 200
        assert bytes(reply.body) == f"re: v{i}".encode()
    sender.send(command("d1", "reboot", b""))  # one-way: accepted once the device has it
    deadline = time.time() + 5
    while not any(t.endswith("/reboot") for t, _ in device.received) and time.time() < deadline:
        time.sleep(0.05)
    one_way = [t for t, _ in device.received if t.endswith("/reboot")]
    assert one_way == ["command///req//reboot"]
    assert device.received[0][0].startswith("command///req/") and device.received[0][0].endswith("/setVolume")
    device.close()
    conn.close()
    replies.close()


def test_gateway_subscribed_for_all_its_devices(provisioned):
    p = provisioned
    gw = MqttDevice(p, "gw@t1", "gwpw", "command//+/req/#")
    replies = Collector(p.url("t1"), "command_response/t1/app-2", name="replies")
    replies.start()
    conn = connect(p.url("t1"))
    sender = conn.create_sender("command/t1", name="commands")
    sender.send(command("child", "open", b"door", reply_to="command_response/t1/app-2", msg_id="gw-1"))
    reply = replies.next(timeout=10)
    assert reply.correlation_id == "gw-1" and reply.properties["status"] == 200
    assert gw.received[0][0].startswith("command//child/req/")
    # d1 does not list gw in `via`: nobody may take the command.
    with pytest.raises(SendException) as err:
        sender.send(command("d1", "open", b"x"))
    assert err.value.state == RELEASED
    gw.close()
    conn.close()
    replies.close()


def test_outcomes_released_and_rejected(provisioned):
    p = provisioned
    conn = connect(p.url("t1"))
    sender = conn.create_sender("command/t1", name="commands")
    with pytest.raises(SendException) as err:
        sender.send(command("d1", "ping", b"x"))  # not connected
    assert err.value.state == RELEASED
    with pytest.raises(SendException) as err:
        sender.send(Message(address="command/t1/d1", body=b"no subject"))
    assert err.value.state == REJECTED
    with pytest.raises(SendException) as err:
        sender.send(Message(address="command/t2/d1", subject="x", body=b"foreign"))
    assert err.value.state == REJECTED
    conn.close()


def test_curl_device_long_polls_for_a_command(provisioned):
    p = provisioned
    replies = Collector(p.url("t1"), "command_response/t1/app-3", name="replies")
    replies.start()
    http = p.listeners["http"]
    poll = subprocess.Popen(
        ["curl", "-s", "-i", "-u", "d1@t1:pw1", "-H", "content-type: text/plain", "-H", "hono-ttd: 10",
         "--data-binary", "21.5", "-H", "QoS-Level: 0", f"http://{http}/event"],
        stdout=subprocess.PIPE, text=True)
    conn = connect(p.url("t1"))
    # The device's event goes first; then it waits for a command.
    events = Collector(p.url("t1"), "event/t1", name="events")
    events.start()
    sender = conn.create_sender("command/t1", name="commands")
    deadline = time.time() + 10
    while True:
        try:
            sender.send(command("d1", "setTemp", b"22", reply_to="command_response/t1/app-3", msg_id="http-1"))
            break
        except SendException:
            assert time.time() < deadline, "the polling device never took the command"
            time.sleep(0.2)
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
    reply = replies.next(timeout=10)
    assert reply.correlation_id == "http-1" and reply.properties["status"] == 200
    assert res.stdout == "202"
    conn.close()
    events.close()
    replies.close()


def test_deferred_command_survives_restart_and_expires(provisioned):
    p = provisioned
    conn = connect(p.url("t1"))
    sender = conn.create_sender("command/t1", name="commands")
    sender.send(command("d1", "later", b"keep me", **{"x-ferrule-defer-ttl": 60}))  # accepted: stored
    sender.send(command("d1", "expiring", b"too late", **{"x-ferrule-defer-ttl": 1}))
    conn.close()
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


def test_coap_device_waits_for_a_command_with_hono_ttd(provisioned, tmp_path):
    p = provisioned
    Registry(p.registry_url, p.registry_token).device("t1", "c1", psk="coap-secret-key")
    replies = Collector(p.url("t1"), "command_response/t1/app-4", name="replies")
    replies.start()
    events = Collector(p.url("t1"), "event/t1", name="events")
    events.start()
    args = lambda cmd: [a.replace("d1@t1", "c1@t1") for a in cmd]  # noqa: E731
    poll = subprocess.Popen(args(coap_client(p, ["-m", "post", "-t", "0", "-e", "21.5"], "/e?hono-ttd=10", tmp_path / "cmd")),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    conn = connect(p.url("t1"))
    sender = conn.create_sender("command/t1", name="commands")
    deadline = time.time() + 15
    while True:
        try:
            sender.send(command("c1", "setLed", b"on", reply_to="command_response/t1/app-4", msg_id="coap-1"))
            break
        except SendException:
            assert time.time() < deadline, "the polling CoAP device never took the command"
            time.sleep(0.2)
    log = poll.communicate(timeout=40)[0]
    assert (tmp_path / "cmd").read_text() == "on", log
    line = [l for l in log.splitlines() if "Location-Query" in l][-1]
    assert "hono-command=setLed" in line, line
    req_id = [seg.split(",")[0].split(" ")[0].rstrip("]") for seg in line.split("Location-Path:")[1:]][-1]
    res = subprocess.run(args(coap_client(p, ["-m", "post", "-t", "0", "-e", "done"],
                                          f"/command_response/{req_id}?hono-cmd-status=200", tmp_path / "res")),
                         capture_output=True, text=True, timeout=40)
    reply = replies.next(timeout=10)
    assert reply.correlation_id == "coap-1" and reply.properties["status"] == 200, res.stdout
    conn.close()
    events.close()
    replies.close()
