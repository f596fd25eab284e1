"""Flow control from devices to applications, with clients nobody here wrote
(python-qpid-proton, paho-mqtt): a burst the application can absorb costs no device its
connection, outcomes travel back whatever the consumer's credit, and durable
subscriptions are told apart as AMQP 1.0 says (container id and link name).

Each test starts a real `ferrule serve` process (conftest.py) and talks to it over TCP.
"""
import subprocess
import threading
import time

import paho.mqtt.client as paho
from proton.handlers import MessagingHandler
from proton.reactor import Container, DurableSubscription

from amqp_client import Collector, connect, connect_as, message
from registry_client import Registry


class CreditOneReceiver(MessagingHandler):
    """An application that grants credit 1 once, accepts the message it gets when told to
    (`may_accept`) and grants nothing more (proton's event API with prefetch 0: credit
    only as asked)."""

    def __init__(self, url, address, initial_credit=1):
        super().__init__(prefetch=0, auto_accept=False)
        self.url, self.address, self.initial_credit = url, address, initial_credit
        self.receiver = None
        self.grant = threading.Event()  # set: one more credit, once
        self.bodies = []
        self.attached = threading.Event()
        self.received = threading.Event()
        self.may_accept = threading.Event()
        self.accepted = threading.Event()
        self.pending = None
        self.done = threading.Event()
        self.error = None

    def on_start(self, event):
        self.conn = event.container.connect(
            self.url, allowed_mechs="PLAIN", allow_insecure_mechs=True
        )
        self.receiver = event.container.create_receiver(self.conn, self.address)
        event.container.schedule(0.05, self)

    def on_link_opened(self, event):
        if self.initial_credit:
            event.receiver.flow(self.initial_credit)
        self.attached.set()

    def on_message(self, event):
        body = event.message.body  # a Data section is a view into proton's buffer: copy it
        self.bodies.append(bytes(body) if isinstance(body, memoryview) else body)
        self.pending = event.delivery
        self.received.set()

    def on_timer_task(self, event):
        if self.grant.is_set():
            self.grant.clear()
            self.receiver.flow(1)
        if self.pending is not None and self.may_accept.is_set():
            self.accept(self.pending)
            self.pending = None
            self.accepted.set()
        if self.done.is_set():
            self.conn.close()  # the container's run() returns once it is closed
        else:
            event.container.schedule(0.05, self)

    def on_transport_error(self, event):
        self.error = event.transport.condition


def send_one(url, address, body, results, attached):
    """Sends `body` and records how the platform settled it (or the exception)."""
    conn = connect(url)
    try:
        sender = conn.create_sender(address)
        attached.release()
        sender.send(message(body))  # waits for the outcome
        results[body] = ("accepted", time.time())
    except Exception as e:  # SendException: released or rejected
        results[body] = (repr(e), time.time())
    finally:
        conn.close()


def test_an_accept_reaches_the_producer_without_more_credit(platform):
    url = platform.url("t1")
    app = CreditOneReceiver(url, "telemetry/t1")
    container = threading.Thread(target=Container(app).run, daemon=True)
    container.start()
    assert app.attached.wait(10), "receiver attached"
    # Two producers: one message reaches the application (credit 1), the other waits on
    # the platform for credit the application does not grant.
    results = {}
    attached = threading.Semaphore(0)
    producers = [
        threading.Thread(
            target=send_one, args=(url, "telemetry/t1", body, results, attached), daemon=True
        )
        for body in ("first", "second")
    ]
    for p in producers:
        p.start()
    assert app.received.wait(10), "the application got one message"
    for _ in producers:
        assert attached.acquire(timeout=10), "producer attached"
    # Both messages are at the platform now (a send follows its attach at once): one with
    # the application, one waiting for credit. Only then does the application accept.
    time.sleep(1.0)
    app.may_accept.set()
    assert app.accepted.wait(10), "the application accepted its message"
    [delivered] = app.bodies
    deadline = time.time() + 5
    while delivered not in results and time.time() < deadline:
        time.sleep(0.02)
    try:
        assert delivered in results, (
            "the producer of the accepted message got no outcome while the application "
            "granted no further credit"
        )
        assert results[delivered][0] == "accepted", results[delivered]
        assert len(app.bodies) == 1, "no delivery beyond the credit granted"
    finally:
        app.done.set()
        container.join(10)
        for p in producers:
            p.join(15)
    assert app.error is None, app.error
    # The other message never reached the application: settled otherwise once it left.
    other = "second" if delivered == "first" else "first"
    assert other in results and results[other][0] != "accepted", results


def test_durable_subscriptions_are_keyed_by_container_and_link_name(platform):
    url = platform.url("t1")

    def subscriber(container_id):
        conn = connect_as(url, container_id)
        receiver = conn.create_receiver("news/t1", name="same-name", options=DurableSubscription())
        return conn, receiver

    apps = {cid: subscriber(cid) for cid in ("app-a", "app-b")}
    pub_conn = connect(url)
    pub = pub_conn.create_sender("news/t1")
    for i in range(10):
        pub.send(message(i))
    for cid, (conn, receiver) in apps.items():
        got = []
        for _ in range(10):
            got.append(receiver.receive(timeout=5).body)
            receiver.accept()
        assert got == list(range(10)), f"{cid} gets every message, not a share: {got}"
        conn.close()  # leaves the durable subscriptions in place

    # While both are away, each subscription keeps its own copy; the same container id
    # and link name resume it.
    pub.send(message("while-away"))
    pub_conn.close()
    for cid in ("app-b", "app-a"):
        conn, receiver = subscriber(cid)
        assert receiver.receive(timeout=5).body == "while-away", cid
        receiver.accept()
        receiver.close()  # closing the link ends the subscription
        conn.close()


def test_a_burst_the_application_absorbs_costs_no_device_its_connection(platform):
    """Four paho-mqtt devices with 100 QoS 1 publishes in flight each (400 outstanding,
    more than a consumer link's prefetch) and a proton application with credit 100 that is
    slower than they are: devices wait for their PUBACKs instead of being disconnected,
    and every message arrives."""
    reg = Registry(platform.registry_url, platform.registry_token)
    reg.tenant("t1")
    devices = [f"burst{i}" for i in range(4)]
    for d in devices:
        reg.device("t1", d, password=f"pw-{d}")
    app = Collector(platform.url("t1"), "telemetry/t1", credit=100)
    app.start()
    per_device = 1500
    port = int(platform.listeners["mqtt"].rsplit(":", 1)[1])
    clients, infos, disconnects = [], [], []
    for d in devices:
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=d, protocol=paho.MQTTv311)
        client.username_pw_set(f"{d}@t1", f"pw-{d}")
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)  # unlimited: paho queues beyond the window
        client.on_disconnect = lambda c, userdata, flags, rc, props, d=d: disconnects.append((d, rc))
        client.connect("127.0.0.1", port)
        client.loop_start()
        clients.append(client)
    try:
        for i in range(per_device):
            for d, client in zip(devices, clients):
                infos.append(client.publish("telemetry", f"{d}:{i}".encode(), qos=1))
        deadline = time.time() + 120
        while not all(info.is_published() for info in infos) and time.time() < deadline:
            assert not disconnects, f"a device lost its connection: {disconnects[:3]}"
            time.sleep(0.1)
        assert not disconnects, f"a device lost its connection: {disconnects[:3]}"
        assert all(info.is_published() for info in infos), "every publish was acknowledged"
        want = {f"{d}:{i}".encode() for d in devices for i in range(per_device)}
        deadline = time.time() + 30
        while len(app.bodies) < len(want) and time.time() < deadline:
            time.sleep(0.1)
        got = {bytes(body) for body in app.bodies}
        assert got == want, f"{len(want - got)} acknowledged messages missing"
    finally:
        for client in clients:
            client.disconnect()
            client.loop_stop()
        app.close()
    assert app.error is None, app.error


def test_http_and_coap_devices_wait_for_a_busy_application(platform):
    """curl (HTTP, QoS 1) and coap-client (libcoap, CON) upload while the application is
    attached without credit: they are answered 202 / 2.04 once it grants credit and
    accepts (before: 503 / 5.03 at once). The CoAP request waits longer than the CoAP
    ACK timeout: it gets an empty ACK first and the answer as a separate response."""
    reg = Registry(platform.registry_url, platform.registry_token)
    reg.tenant("t1", unauthenticated=True)
    reg.device("t1", "d1", password="pw1")
    app = CreditOneReceiver(platform.url("t1"), "telemetry/t1", initial_credit=0)
    app.may_accept.set()
    container = threading.Thread(target=Container(app).run, daemon=True)
    container.start()
    assert app.attached.wait(10), "receiver attached"
    http = platform.listeners["http"]
    coap = platform.listeners["coap"]
    devices = {
        "http": subprocess.Popen(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", "d1@t1:pw1",
             "-H", "content-type: text/plain", "-H", "QoS-Level: 1", "--data-binary", "over http",
             f"http://{http}/telemetry"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "coap": subprocess.Popen(
            ["coap-client-notls", "-v", "7", "-m", "put", "-t", "text/plain", "-e", "over coap",
             f"coap://{coap}/telemetry/t1/d1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    }
    try:
        time.sleep(3.0)  # longer than CoAP's ACK timeout (2 s): the device must not give up
        for name, device in devices.items():
            assert device.poll() is None, f"{name} device answered before the application had credit"
        for _ in devices:
            app.accepted.clear()
            app.grant.set()
            assert app.accepted.wait(10), "the application took a message"
        outputs = {name: device.communicate(timeout=20) for name, device in devices.items()}
    finally:
        app.done.set()
        container.join(10)
    assert devices["http"].returncode == 0 and outputs["http"][0] == "202", outputs["http"]
    assert devices["coap"].returncode == 0, outputs["coap"]
    # libcoap's debug log (-v 7): the empty ACK, then the answer as a separate CON.
    log = outputs["coap"][0] + outputs["coap"][1]
    assert "t:ACK c:0.00" in log and "t:CON c:2.04" in log, log
    assert sorted(bytes(b) for b in app.bodies) == [b"over coap", b"over http"], app.bodies


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def mqtt_packet(kind, body):
    n, length = len(body), b""
    while True:
        byte, n = n % 128, n // 128
        length += bytes([byte | (128 if n else 0)])
        if not n:
            return bytes([kind]) + length + body


def test_a_device_flooding_qos0_is_read_no_faster_than_it_is_delivered(platform):
    """One MQTT 3.1.1 connection writes QoS 0 publishes as fast as TCP takes them while the
    application is attached without credit. Ferrule must stop reading from the device
    (bounded in-flight publishes per connection), not read everything into memory: before,
    ntex-mqtt's in-flight limit did not hold for back-to-back publishes and Ferrule held
    every publish it had read (~8 KiB each, 1.7 GB in 3 s in the benchmark)."""
    import socket
    import struct

    reg = Registry(platform.registry_url, platform.registry_token)
    reg.tenant("t1", unauthenticated=True).device("t1", "d1")
    app = CreditOneReceiver(platform.url("t1"), "telemetry/t1", initial_credit=0)
    container = threading.Thread(target=Container(app).run, daemon=True)
    container.start()
    assert app.attached.wait(10), "receiver attached"
    host, port = platform.listeners["mqtt"].rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    try:
        client_id = b"flood"
        connect = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack(">H", len(client_id)) + client_id
        s.sendall(mqtt_packet(0x10, connect))
        assert s.recv(4) == b"\x20\x02\x00\x00", "CONNACK accepted"
        topic = b"telemetry/t1/d1"
        publish = mqtt_packet(0x30, struct.pack(">H", len(topic)) + topic + b"x" * 64)
        batch = publish * 1000
        before = rss_kib(platform.proc.pid)
        s.setblocking(False)
        written, deadline = 0, time.time() + 3
        while time.time() < deadline:
            try:
                written += s.send(batch[written % len(batch):])
            except BlockingIOError:
                time.sleep(0.01)
        grown = rss_kib(platform.proc.pid) - before
        published = written // len(publish)
        # Kernel buffers on loopback take some megabytes; everything beyond them would
        # have been read into Ferrule without a bound.
        assert grown < 64 * 1024, f"RSS grew by {grown} KiB while {published} publishes were written"
        assert published < 2_000_000, f"{published} publishes were taken in 3 s: nothing pushed back"
        # The device is slowed down, not cut off: the connection is still open.
        s.setblocking(True)
        s.settimeout(0.2)
        try:
            assert s.recv(1) != b"", "connection closed"
        except socket.timeout:
            pass
    finally:
        s.close()
        app.done.set()
        container.join(10)
