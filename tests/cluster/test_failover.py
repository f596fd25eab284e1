"""Failover (issue 15): an instance killed with SIGKILL under command and event load.
Devices (paho-mqtt) reconnect to another instance by themselves; every command the
application (python-qpid-proton) saw `accepted` reached a device, every event a device
saw acknowledged reaches the application, and commands flow again within the lease time
plus the reconnect."""
import threading
import time
import uuid

import paho.mqtt.client as paho
from proton import Message
from proton.utils import SendException

from amqp_client import Collector, connect
from conftest import TOKEN, unique_tenant
from registry_client import Registry

DEVICES = 8


class Device:
    """A device (paho-mqtt, MQTT 5) that takes commands and publishes QoS 1 events; the
    test moves it to another instance when its own dies (client-side failover: paho
    alone would retry the same host)."""

    def __init__(self, tenant, name, instance):
        self.tenant, self.name = tenant, name
        self.commands = []  # payloads of the commands received, over every connection
        self.acked = set()  # events the platform acknowledged (PUBACK success)
        self.lock = threading.Lock()
        self.client = None
        self.connect(instance)

    def connect(self, instance):
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{self.name}-{uuid.uuid4().hex[:6]}",
                             protocol=paho.MQTTv5)
        client.username_pw_set(f"{self.name}@{self.tenant}", "pw1")
        ready = threading.Event()
        pending = {}
        client.on_connect = lambda c, u, f, rc, p=None: c.subscribe("command///req/#", qos=1)
        client.on_subscribe = lambda *a, **k: ready.set()
        client.on_message = lambda c, u, msg: self.commands.append(bytes(msg.payload))

        def on_publish(c, u, mid, reason_code, properties):
            with self.lock:
                body = pending.pop(mid, None)
            if body is not None and not reason_code.is_failure:
                self.acked.add(body)

        client.on_publish = on_publish
        host, port = instance.listeners["mqtt"].rsplit(":", 1)
        client.connect(host, int(port))
        client.loop_start()
        assert ready.wait(10), f"{self.name}: no SUBACK from {instance.name}"
        old, self.client, self.pending = self.client, client, pending
        if old is not None:
            old.loop_stop()

    def publish_event(self, body):
        client, pending = self.client, self.pending
        with self.lock:
            info = client.publish("event", body, qos=1)
            pending[info.mid] = body

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def test_killing_an_instance_under_command_and_event_load_loses_nothing_acknowledged(cluster):
    i1, i2, i3 = cluster(3)
    tenant = unique_tenant()
    reg = Registry(i1.registry_url, TOKEN)
    reg.tenant(tenant)
    for k in range(DEVICES):
        reg.device(tenant, f"d{k}", password="pw1")
    events = Collector(i1.amqp_url(tenant), f"event/{tenant}", credit=200)
    events.start()
    # Every device on instance 3; when it dies they move to instance 2.
    devices = [Device(tenant, f"d{k}", i3) for k in range(DEVICES)]
    conn = connect(i1.amqp_url(tenant))
    sender = conn.create_sender(f"command/{tenant}")
    outcomes = {"accepted": [], "released": [], "other": []}
    killed_at = None
    first_after_kill = None
    stop_events = threading.Event()

    def publish_events():
        n = 0
        while not stop_events.is_set():
            for d in devices:
                d.publish_event(f"{d.name}-e{n}".encode())
            n += 1
            time.sleep(0.05)

    publisher = threading.Thread(target=publish_events, daemon=True)
    publisher.start()
    try:
        deadline = time.time() + 40
        k = 0
        while time.time() < deadline:
            d = devices[k % DEVICES]
            body = f"cmd-{k}".encode()
            try:
                sender.send(Message(address=f"command/{tenant}/{d.name}", subject="set", body=body))
                outcomes["accepted"].append((d, body))
                if killed_at and first_after_kill is None:
                    first_after_kill = time.time() - killed_at
            except SendException as e:
                outcomes["released" if e.state == 0x26 else "other"].append((d, body))
            k += 1
            if k == 100:
                i3.kill()
                killed_at = time.time()
                for d in devices:  # they notice the lost connection and reconnect elsewhere
                    threading.Thread(target=d.connect, args=(i2,), daemon=True).start()
            if killed_at and first_after_kill is not None and len(outcomes["accepted"]) > 200:
                break
            time.sleep(0.01)
    finally:
        stop_events.set()
        publisher.join(5)
    time.sleep(2)  # the last outcomes and events land
    try:
        assert killed_at is not None and first_after_kill is not None, "no command accepted after the kill"
        # Lease (5 s) + the devices' reconnect + a second of slack.
        assert first_after_kill < 10, f"commands flowed again only {first_after_kill:.1f} s after the kill"
        # Every command the application saw accepted reached its device.
        lost = [body for d, body in outcomes["accepted"] if body not in d.commands]
        assert not lost, f"{len(lost)} accepted commands never reached their device: {lost[:5]}"
        assert not outcomes["other"], outcomes["other"][:5]
        # Every event a device saw acknowledged reached the application.
        got = {bytes(m.body) for m in events.messages}
        acked = set().union(*(d.acked for d in devices))
        missing = acked - got
        assert not missing, f"{len(missing)} of {len(acked)} acknowledged events lost: {sorted(missing)[:5]}"
        print(f"commands: {len(outcomes['accepted'])} accepted, {len(outcomes['released'])} released; "
              f"first accepted {first_after_kill:.1f} s after the kill; events: {len(acked)} acknowledged, all received")
    finally:
        for d in devices:
            d.close()
        conn.close()
        events.close()
