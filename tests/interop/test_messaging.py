"""The messaging core against python-qpid-proton, an AMQP 1.0 client nobody here wrote.

Each test starts a real `ferrule serve` process (conftest.py) and talks to it over TCP.
"""
import threading
import time
import uuid

import pytest
from proton import ConnectionException, Message, Timeout
from proton.reactor import AtMostOnce, DurableSubscription
from proton.utils import LinkDetached, SendException

from amqp_client import Collector, connect, connect_as, message


def wait_until(predicate, timeout=30.0, interval=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def send_all(url, address, bodies, durable=True, **props):
    conn = connect(url)
    sender = conn.create_sender(address)
    for body in bodies:
        sender.send(message(body, durable=durable, **props))  # waits for the outcome; raises unless accepted
    conn.close()


def collectors(url, address, n=2):
    """`n` started Collectors of `address`."""
    receivers = [Collector(url, address) for _ in range(n)]
    for r in receivers:
        r.start()
    return receivers


def close_all(receivers):
    """Stops the Collectors after a moment for anything extra (a duplicate) to show up."""
    time.sleep(0.3)
    for r in receivers:
        r.close()
        assert r.error is None, r.error


def test_competing_consumers_share_the_stream_exactly_once(platform):
    url = platform.url("t1")
    receivers = collectors(url, "telemetry/t1")
    total = 10_000
    send_all(url, "telemetry/t1", range(total), durable=False)
    assert wait_until(lambda: sum(len(r.bodies) for r in receivers) >= total)
    close_all(receivers)
    got = receivers[0].bodies + receivers[1].bodies
    assert len(receivers[0].bodies) > 0 and len(receivers[1].bodies) > 0, "both consumers get some"
    assert len(got) == total, "none twice"
    assert sorted(got) == list(range(total)), "together exactly all"


def test_multicast_gives_every_receiver_everything(platform):
    url = platform.url("t1")
    receivers = collectors(url, "broadcast/t1")
    total = 1_000
    send_all(url, "broadcast/t1", range(total), durable=False)
    assert wait_until(lambda: all(len(r.bodies) >= total for r in receivers))
    close_all(receivers)
    for r in receivers:
        assert r.bodies == list(range(total))


def test_direct_address_without_receiver_is_not_accepted(platform):
    conn = connect(platform.url("t1"))
    sender = conn.create_sender("telemetry/t1")
    with pytest.raises(SendException) as err:
        sender.send(message("nobody listens"))
    # proton's Delivery.RELEASED
    assert err.value.state == 0x26, f"expected released, got {err.value.state}"
    conn.close()


def test_events_survive_sigkill_in_order_once(platform_factory):
    p = platform_factory().start()
    url = p.url("t1")
    total = 1_000
    send_all(url, "event/t1", range(total))
    p.kill()
    p.start()
    url = p.url("t1")
    conn = connect(url)
    receiver = conn.create_receiver("event/t1", credit=50)
    got = []
    for _ in range(total):
        got.append(receiver.receive(timeout=10).body)
        receiver.accept()
    with pytest.raises(Timeout):
        receiver.receive(timeout=1)  # nothing more: each once
    conn.close()
    assert got == list(range(total))
    # Accepted by the consumer means gone, also after a (graceful) restart.
    assert p.stop() == 0
    p.start()
    conn = connect(p.url("t1"))
    receiver = conn.create_receiver("event/t1")
    with pytest.raises(Timeout):
        receiver.receive(timeout=1)
    conn.close()


def test_event_ttl_expires_before_delivery(platform):
    url = platform.url("t1")
    conn = connect(url)
    sender = conn.create_sender("event/t1")
    sender.send(Message(body="short-lived", durable=True, ttl=1.0))
    time.sleep(2.0)
    sender.send(Message(body="still-here", durable=True))
    # One connection, both directions on one address: distinct link names (see ARCHITECTURE).
    receiver = conn.create_receiver("event/t1", name="ttl-receiver")
    msg = receiver.receive(timeout=5)
    receiver.accept()
    assert msg.body == "still-here"
    with pytest.raises(Timeout):
        receiver.receive(timeout=0.5)
    conn.close()


def test_released_event_is_redelivered_and_rejected_one_dead_lettered(platform):
    url = platform.url("t1")
    send_all(url, "event/t1", ["a", "b"])
    conn = connect(url)
    receiver = conn.create_receiver("event/t1", credit=1)
    first = receiver.receive(timeout=5)
    assert first.body == "a"
    receiver.release()
    # The server may already have the next message on its way (one-message lookahead),
    # so the released one comes back among the next two.
    nxt = [receiver.receive(timeout=5)]
    if nxt[0].body == "a":
        receiver.reject()
        nxt.append(receiver.receive(timeout=5))
        receiver.accept()
    else:
        receiver.accept()
        nxt.append(receiver.receive(timeout=5))
        assert nxt[1].body == "a"
        receiver.reject()
    assert sorted(m.body for m in nxt) == ["a", "b"]
    with pytest.raises(Timeout):
        receiver.receive(timeout=0.5)
    dlq = conn.create_receiver("event/t1/dlq")
    dead = dlq.receive(timeout=5)
    dlq.accept()
    assert dead.body == "a"
    assert dead.annotations["x-opt-ferrule-dead-letter-reason"] == "rejected"
    assert dead.annotations["x-opt-ferrule-original-address"] == "event/t1"
    conn.close()


def test_full_queue_refuses_clearly(platform_factory):
    p = platform_factory(max_depth=5).start()
    conn = connect(p.url("t1"))
    sender = conn.create_sender("event/t1")
    for i in range(5):
        sender.send(message(i, durable=True))
    with pytest.raises(SendException) as err:
        sender.send(message("one too many", durable=True))
    assert err.value.state == 0x25  # REJECTED
    conn.close()


def test_request_response_with_dynamic_reply_address(platform):
    url = platform.url("t1")
    ready = threading.Event()
    errors = []

    def responder():
        try:
            conn = connect(url)
            requests = conn.create_receiver("service/t1")
            replies = conn.create_sender(None)  # anonymous relay: routed by `to`
            ready.set()
            for _ in range(3):
                req = requests.receive(timeout=10)
                requests.accept()
                replies.send(Message(address=req.reply_to, correlation_id=req.id, body=f"re: {req.body}"))
            conn.close()
        except Exception as e:  # surfaced below
            errors.append(e)
            ready.set()

    t = threading.Thread(target=responder, daemon=True)
    t.start()
    assert ready.wait(10)
    conn = connect(url)
    replies = conn.create_receiver(None, dynamic=True)
    reply_to = replies.link.remote_source.address
    assert reply_to and reply_to.startswith("dynamic/t1/"), reply_to
    requests = conn.create_sender("service/t1")
    for i in range(3):
        rid = str(uuid.uuid4())
        requests.send(Message(id=rid, reply_to=reply_to, body=f"q{i}"))
        reply = replies.receive(timeout=10)
        replies.accept()
        assert reply.correlation_id == rid
        assert reply.body == f"re: q{i}"
    conn.close()
    t.join(10)
    assert not errors, errors


def test_topic_durable_subscription_keeps_messages_while_away(platform):
    url = platform.url("t1")
    # A plain subscription gets what is published while it is attached. A durable one is
    # resumed by the same container id and link name (AMQP 1.0 2.6.1).
    conn = connect_as(url, "news-reader")
    plain = conn.create_receiver("news/t1", name="plain-sub")
    durable = conn.create_receiver("news/t1", name="my-sub", options=DurableSubscription())
    pub = conn.create_sender("news/t1", name="publisher")
    pub.send(message("hello subscribers"))
    for sub in (plain, durable):
        got = sub.receive(timeout=5)
        sub.accept()
        assert got.body == "hello subscribers"
    conn.close()  # drops the links without closing them: the durable one stays

    send_all(url, "news/t1", ["while-away-1", "while-away-2"])
    platform.stop()
    platform.start()
    url = platform.url("t1")
    conn = connect_as(url, "news-reader")
    durable = conn.create_receiver("news/t1", name="my-sub", options=DurableSubscription())
    got = []
    for _ in range(2):
        got.append(durable.receive(timeout=5).body)
        durable.accept()
    assert got == ["while-away-1", "while-away-2"]
    durable.close()  # closing the link deletes the subscription
    send_all(url, "news/t1", ["after-unsubscribe"])
    again = conn.create_receiver("news/t1", name="my-sub", options=DurableSubscription())
    with pytest.raises(Timeout):
        again.receive(timeout=0.5)
    conn.close()


def test_wrong_password_is_refused(platform):
    started = time.time()
    with pytest.raises(ConnectionException):
        connect(platform.url("t1", password="not-the-password"), timeout=10)
    assert time.time() - started < 10, "refused, not timed out"


def test_foreign_tenant_address_is_refused_with_an_amqp_error(platform):
    conn = connect(platform.url("t1"), timeout=10)
    started = time.time()
    with pytest.raises(LinkDetached) as err:
        receiver = conn.create_receiver("telemetry/t2")
        receiver.receive(timeout=5)
    assert "unauthorized-access" in str(err.value), str(err.value)
    with pytest.raises(LinkDetached) as err:
        sender = conn.create_sender("telemetry/t2")
        sender.send(message("x"))
    assert "unauthorized-access" in str(err.value), str(err.value)
    assert time.time() - started < 10, "no hang"
    # Anonymous relay to another tenant is refused per message.
    relay = conn.create_sender(None)
    with pytest.raises(SendException) as err:
        relay.send(Message(address="telemetry/t2", body="x"))
    assert err.value.state == 0x25  # REJECTED
    conn.close()


def test_unknown_address_is_refused(platform):
    conn = connect(platform.url("t1"))
    with pytest.raises(LinkDetached) as err:
        receiver = conn.create_receiver("nowhere/t1")
        receiver.receive(timeout=5)
    assert "not-found" in str(err.value)
    conn.close()


def test_presettled_transfers_are_at_most_once(platform):
    url = platform.url("t1")
    receiver = Collector(url, "telemetry/t1")
    receiver.start()
    conn = connect(url)
    sender = conn.create_sender("telemetry/t1", name="fire-and-forget", options=AtMostOnce())
    for i in range(100):
        sender.send(message(i))  # pre-settled: returns without waiting for an outcome
    # The blocking API does I/O only while it waits for something on this connection: an
    # unsettled send makes it write out the pre-settled transfers queued before it.
    conn.create_sender("event/t1", name="flush").send(message("flush", durable=True))
    assert wait_until(lambda: len(receiver.bodies) >= 100, timeout=10)
    receiver.stop.set()
    receiver.join(5)
    assert receiver.bodies == list(range(100))
    # Nobody listening any more: pre-settled messages are dropped, the link stays usable.
    time.sleep(0.3)
    for i in range(10):
        sender.send(message(i))
    plain = conn.create_sender("telemetry/t1", name="unsettled")
    with pytest.raises(SendException):
        plain.send(message("needs a consumer"))
    conn.close()
