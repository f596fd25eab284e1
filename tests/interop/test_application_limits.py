"""What one tenant's application can make the platform hold (issue 17): a python-qpid-proton
application sends a 64 MiB event, uses 10,000 fresh reply addresses and asks for addresses
of its own invention; the platform refuses with the AMQP conditions, creates nothing it
keeps, and its memory stays flat while another application's telemetry keeps flowing."""
import time
import uuid

import pytest
from proton import Message
from proton.utils import LinkDetached, SendException

from amqp_client import Collector, connect, message
from test_ops import get, metric

RELEASED = 0x26


def rss_kib(p):
    for line in open(f"/proc/{p.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_64_mib_event_is_refused_with_message_size_exceeded(platform):
    p = platform
    before = rss_kib(p)
    conn = connect(p.url("t1"))
    sender = conn.create_sender("event/t1", name="big")
    with pytest.raises(LinkDetached) as err:
        sender.send(Message(body=b"x" * (64 * 1024 * 1024), durable=True))
    assert "amqp:link:message-size-exceeded" in str(err.value), str(err.value)
    conn.close()
    grown_mib = (rss_kib(p) - before) / 1024
    assert grown_mib < 32, f"RSS grew {grown_mib:.0f} MiB for a refused message"
    # Nothing was stored; a message within the limit is taken on a new link.
    conn = connect(p.url("t1"))
    conn.create_sender("event/t1", name="small").send(message("ok", durable=True))
    receiver = conn.create_receiver("event/t1", name="r")
    assert receiver.receive(timeout=5).body == "ok"
    receiver.accept()
    conn.close()
    _, text = get(p, "/metrics")
    assert metric(text, "ferrule_queue_enqueued_total", address="event/t1") == 1
    assert metric(text, "ferrule_amqp_refused_total", reason="message_size") == 1


def test_only_hono_address_shapes_below_the_tenant(platform):
    conn = connect(platform.url("t1"))
    for address in ["event/t1/mine", "telemetry/t1/0b5f", "command_response/t1"]:
        with pytest.raises(LinkDetached) as err:
            conn.create_receiver(address).receive(timeout=5)
        assert "amqp:not-found" in str(err.value), (address, str(err.value))
        with pytest.raises(LinkDetached) as err:
            conn.create_sender(address).send(message("x", durable=True))
        assert "amqp:not-found" in str(err.value), (address, str(err.value))
    relay = conn.create_sender(None)
    with pytest.raises(SendException) as err:
        relay.send(Message(address="event/t1/mine", body="x", durable=True))
    assert err.value.state == 0x25  # rejected
    # The dead-letter queue of the tenant's events is one of the shapes.
    conn.create_receiver("event/t1/dlq", name="dlq")
    conn.close()


def test_ten_thousand_fresh_reply_addresses_do_not_add_up(platform):
    p = platform
    telemetry = Collector(p.url("t1"), "telemetry/t1", credit=100, name="steady")
    telemetry.start()
    conn = connect(p.url("t1"))
    relay = conn.create_sender(None)
    before = rss_kib(p)
    # Fewer than the tenant's address limit (1,000) between two collections.
    for i in range(800):
        conn.create_receiver(f"command_response/t1/{uuid.uuid4()}").close()
    released = 0
    for i in range(10_000):
        try:
            relay.send(Message(address=f"command_response/t1/{uuid.uuid4()}", body="late"))
        except SendException as e:
            released += e.state == RELEASED
    assert released == 10_000, "nobody listens on a fresh reply address"
    # Another application's telemetry still flows.
    steady = conn.create_sender("telemetry/t1", name="steady-sender")
    steady.send(message("still here"))
    assert telemetry.next(timeout=5).body == "still here"
    conn.close()
    telemetry.close()

    time.sleep(2.5)  # the maintenance tick (expiry_check_interval, 1 s) collects idle nodes
    _, text = get(p, "/metrics")
    nodes = metric(text, "ferrule_address_nodes")
    assert nodes is not None and nodes <= 5, f"{nodes} address nodes left"
    assert "command_response/t1/" not in text, "reply addresses got metric series"
    grown_mib = (rss_kib(p) - before) / 1024
    assert grown_mib < 32, f"RSS grew {grown_mib:.0f} MiB after 10,800 reply addresses"


def test_a_tenant_has_a_bounded_number_of_addresses(platform_factory, monkeypatch):
    monkeypatch.setenv("FERRULE__MESSAGING__MAX_ADDRESSES_PER_TENANT", "10")
    p = platform_factory().start()
    conn = connect(p.url("t1"))
    receivers, refused = [], None
    try:
        for _ in range(11):
            receivers.append(conn.create_receiver(f"command_response/t1/{uuid.uuid4()}"))
        # The refusal (attach answered, then detached with the error) may come after the
        # attach returned: the next call on the link sees it.
        receivers[-1].receive(timeout=5)
    except LinkDetached as e:
        refused = e
    assert refused is not None, "an eleventh address was made"
    assert "amqp:resource-limit-exceeded" in str(refused), str(refused)
    assert "limit of 10 addresses" in str(refused), str(refused)
    receivers = receivers[:10]
    # A message for a reply address nobody made is released and makes nothing.
    relay = conn.create_sender(None)
    with pytest.raises(SendException) as sent:
        relay.send(Message(address=f"command_response/t1/{uuid.uuid4()}", body="late"))
    assert sent.value.state == RELEASED
    # Another tenant is not limited by t1's addresses.
    other = connect(p.url("t2"))
    other.create_receiver(f"command_response/t2/{uuid.uuid4()}")
    _, text = get(p, "/metrics")
    assert metric(text, "ferrule_tenant_limit_refusals_total", tenant="t1", adapter="amqp", limit="addresses") == 1
    # Closed reply receivers are forgotten on the next maintenance tick: room again.
    for r in receivers:
        r.close()
    time.sleep(2.5)
    conn.create_receiver(f"command_response/t1/{uuid.uuid4()}")
    conn.close()
    other.close()


def test_the_anonymous_relay_is_checked_like_every_sender(platform):
    conn = connect(platform.url("t1"))
    relay = conn.create_sender(None)
    for address, why in [
        ("command_deferred/t1/some-device", "internal to the platform"),
        ("event/t2", "another tenant's address"),
        ("event/t1/invented", "not one of Hono's shapes"),
        (None, "no `to`"),
    ]:
        with pytest.raises(SendException) as err:
            relay.send(Message(address=address, body="x", durable=True))
        assert err.value.state == 0x25, (address, why)  # rejected
    # The relay itself works for what the application may use.
    receiver = conn.create_receiver("event/t1", name="events")
    relay.send(Message(address="event/t1", body="through the relay", durable=True))
    assert receiver.receive(timeout=5).body == "through the relay"
    receiver.accept()
    conn.close()
    _, text = get(platform, "/metrics")
    assert "command_deferred/t1/some-device" not in text, "no deferred queue was made"
