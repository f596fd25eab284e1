"""Commands across instances (issue 15): an application attached to one instance commands
devices connected to others (MQTT via paho-mqtt, HTTP via curl, CoAP via libcoap's
coap-client, a gateway), and gets their responses, which may come back through yet
another instance."""
import re
import subprocess
import time
import uuid

import pytest
from proton import Message
from proton.utils import SendException

from amqp_client import Collector, connect
from conftest import TOKEN, unique_tenant
from registry_client import Registry
from test_commands import MqttDevice
from tls_support import make_pki

PSK = "coap-secret-key"
RELEASED = 0x26


class App:
    """An application on `instance`: a sender to command/T and a collector of responses."""

    def __init__(self, instance, tenant, reply_id="app-1"):
        self.tenant = tenant
        self.reply_to = f"command_response/{tenant}/{reply_id}"
        self.replies = Collector(instance.amqp_url(tenant), self.reply_to, name="replies")
        self.replies.start()
        self.conn = connect(instance.amqp_url(tenant))
        self.sender = self.conn.create_sender(f"command/{tenant}", name="commands")

    def message(self, device, name, body, msg_id=None, reply=True):
        return Message(address=f"command/{self.tenant}/{device}", subject=name, body=body,
                       reply_to=self.reply_to if reply else None, id=msg_id)

    def request_when_taken(self, device, name, body, msg_id, timeout=15):
        """Sends until a device's session takes it (released while it has none)."""
        deadline = time.time() + timeout
        while True:
            try:
                return self.sender.send(self.message(device, name, body, msg_id))
            except SendException:
                assert time.time() < deadline, f"{device} never took the command"
                time.sleep(0.2)

    def reply(self, correlation_id, timeout=10):
        m = self.replies.next(timeout=timeout)
        assert m.correlation_id == correlation_id, (m.correlation_id, correlation_id)
        return m

    def close(self):
        self.conn.close()
        self.replies.close()


def coap(instance, device, args, path, out):
    return ["coap-client-openssl", "-B", "30", "-v", "7", "-o", str(out), "-u", f"{device}", "-k", PSK,
            *args, f"coaps://{instance.coaps}{path}"]


def http_poll(instance, user, body):
    return subprocess.Popen(
        ["curl", "-s", "-i", "-u", user, "-H", "content-type: text/plain", "-H", "hono-ttd: 15",
         "--data-binary", body, "-H", "QoS-Level: 0", f"http://{instance.http}/event"],
        stdout=subprocess.PIPE, text=True)


def parse_http(out):
    head, _, body = out.partition("\n\n")
    headers = {k.lower(): v.strip() for k, v in (l.split(":", 1) for l in head.splitlines()[1:] if ":" in l)}
    return head, headers, body


@pytest.fixture
def three(cluster):
    i1, i2, i3 = cluster(3)
    tenant = unique_tenant()
    reg = Registry(i1.registry_url, TOKEN)
    reg.tenant(tenant)
    for d in ("mq", "ht", "gw"):
        reg.device(tenant, d, password="pw1")
    reg.device(tenant, "co", psk=PSK)
    reg.device(tenant, "child", via=["gw"])
    return i1, i2, i3, tenant


def test_an_application_on_one_instance_commands_devices_on_every_instance(three, tmp_path):
    i1, i2, i3, tenant = three
    app = App(i1, tenant)
    try:
        # MQTT device on instance 3: request/response and one-way.
        mq = MqttDevice(i3, f"mq@{tenant}", "pw1", "command///req/#")
        for k in range(3):
            mid = f"mqtt-{k}-{uuid.uuid4()}"
            app.request_when_taken("mq", "setVolume", f"v{k}".encode(), mid)
            reply = app.reply(mid)
            assert reply.properties["status"] == 200 and bytes(reply.body) == f"re: v{k}".encode()
            assert reply.properties["device_id"] == "mq"
        app.sender.send(app.message("mq", "reboot", b"", reply=False))  # accepted: the device has it
        assert any(t.endswith("/reboot") for t, _ in mq.received), mq.received
        mq.close()

        # A gateway on instance 2 subscribed for all its devices: a command for its child.
        gw = MqttDevice(i2, f"gw@{tenant}", "pw1", "command//+/req/#")
        app.request_when_taken("child", "open", b"door", "gw-1")
        assert app.reply("gw-1").properties["status"] == 200
        assert gw.received[-1][0].startswith("command//child/req/")
        gw.close()

        # HTTP device polling instance 2; it answers through instance 3.
        poll = http_poll(i2, f"ht@{tenant}:pw1", "21.5")
        app.request_when_taken("ht", "setTemp", b"22", "http-1")
        head, headers, body = parse_http(poll.communicate(timeout=20)[0])
        assert head.startswith("HTTP/1.1 200") and headers["hono-command"] == "setTemp" and body == "22", head
        res = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", f"ht@{tenant}:pw1",
                              "-H", "content-type: text/plain", "--data-binary", "ok",
                              f"http://{i3.http}/command/res/{headers['hono-cmd-req-id']}?hono-cmd-status=200"],
                             capture_output=True, text=True, timeout=15)
        assert res.stdout == "202"
        reply = app.reply("http-1")
        assert reply.properties["status"] == 200 and bytes(reply.body) == b"ok"

        # CoAP device polling instance 1 (the application's own instance).
        poll = subprocess.Popen(coap(i1, f"co@{tenant}", ["-m", "post", "-t", "0", "-e", "21.5"], "/e?hono-ttd=15",
                                     tmp_path / "cmd"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        app.request_when_taken("co", "setLed", b"on", "coap-1")
        log = poll.communicate(timeout=40)[0]
        assert (tmp_path / "cmd").read_text() == "on", log
        line = [l for l in log.splitlines() if "Location-Query" in l][-1]
        req_id = [seg.split(",")[0].split(" ")[0].rstrip("]") for seg in line.split("Location-Path:")[1:]][-1]
        subprocess.run(coap(i1, f"co@{tenant}", ["-m", "post", "-t", "0", "-e", "done"],
                            f"/command_response/{req_id}?hono-cmd-status=200", tmp_path / "res"),
                       capture_output=True, text=True, timeout=40)
        assert app.reply("coap-1").properties["status"] == 200

        # Nobody holds the device anywhere: released at once.
        with pytest.raises(SendException) as err:
            app.sender.send(app.message("mq", "late", b"x", "late-1"))
        assert err.value.state == RELEASED
    finally:
        app.close()


def test_deferred_commands_survive_killing_the_instance_that_kept_them(three):
    """Commands for a device no instance holds are kept in Redis: killing the instance the
    application sent them to (SIGKILL) loses nothing, the device gets the live one when it
    connects to another instance, and the one whose TTL passed is gone."""
    i1, i2, _, tenant = three
    app = App(i1, tenant)
    later = app.message("mq", "later", b"keep me", reply=False)
    later.properties = {"x-ferrule-defer-ttl": 60}
    expiring = app.message("mq", "expiring", b"too late", reply=False)
    expiring.properties = {"x-ferrule-defer-ttl": 1}
    app.sender.send(later)  # accepted: kept
    app.sender.send(expiring)
    i1.kill()
    time.sleep(2)  # the second command's TTL passes
    mq = MqttDevice(i2, f"mq@{tenant}", "pw1", "command///req/#", answer=False)
    try:
        deadline = time.time() + 10
        while not mq.received and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert [t.rsplit("/", 1)[1] for t, _ in mq.received] == ["later"], mq.received
        assert mq.received[0][1] == b"keep me"
    finally:
        mq.close()
    # Delivered once: a reconnect elsewhere gets nothing more.
    again = MqttDevice(i2, f"mq@{tenant}", "pw1", "command///req/#", answer=False)
    time.sleep(1)
    assert again.received == []
    again.close()


def test_commands_between_instances_go_over_verified_tls(cluster, tmp_path):
    """With [cluster] peer_tls_ca_file, instances announce their AMQP TLS listener and hand
    each other commands over TLS, verifying the certificate against that CA: an application
    on instance 1 commands a device on instance 2 (request/response); a third instance whose
    certificate another CA signed is not trusted, and a command for its device is not
    delivered (the application gets a failed outcome, not an acceptance)."""
    good, other = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other-pki")
    tls = lambda pki: f'\n[messaging.tls]\ncert = "{pki["cert"]}"\nkey = "{pki["key"]}"\n'  # noqa: E731
    trust = f'peer_tls_ca_file = "{good["ca"]}"'
    i1, i2 = cluster(2, extra=tls(good), cluster_extra=trust)
    (i3,) = cluster(1, extra=tls(other), cluster_extra=trust)
    for i in (i1, i2, i3):
        log = re.sub(r"\x1b\[[0-9;]*m", "", i.log_text())
        assert "advertise=amqps://127.0.0.1:" in log, "each announces its TLS listener"
    tenant = unique_tenant()
    reg = Registry(i1.registry_url, TOKEN)
    reg.tenant(tenant)
    reg.device(tenant, "mq", password="pw1")
    reg.device(tenant, "far", password="pw1")
    app = App(i1, tenant)
    try:
        mq = MqttDevice(i2, f"mq@{tenant}", "pw1", "command///req/#")
        app.request_when_taken("mq", "setVolume", b"v1", "tls-1")
        reply = app.reply("tls-1")
        assert reply.properties["status"] == 200 and bytes(reply.body) == b"re: v1"
        mq.close()

        far = MqttDevice(i3, f"far@{tenant}", "pw1", "command///req/#")
        with pytest.raises(SendException):
            app.sender.send(app.message("far", "setVolume", b"v2", "tls-2"))
        assert not far.received, "nothing reached a device behind an untrusted instance"
        far.close()
    finally:
        app.close()
