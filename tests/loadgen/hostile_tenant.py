#!/usr/bin/env python3
"""The hostile tenant of bench.py's `isolation` scenario: one tenant that runs into every
limit it has at once, and counts how it was refused.

    python3 tests/loadgen/hostile_tenant.py --mqtt 127.0.0.1:1883 --amqp 127.0.0.1:5672 \
        --tenant iso-a --password PW --app-user app@iso-a --app-password SECRET --duration 30

* MQTT 5 devices `dev{i}@TENANT` (raw sockets, one thread, no client library): opens
  --connections of them (more than the tenant's `max-connections`; refused ones retry every
  --retry seconds), and floods QoS 1 telemetry at --rate msgs/s in total (far over
  `max_messages_per_second_per_tenant`), each connection keeping up to 16 PUBLISHes (or
  the server's Receive Maximum) in flight. Counts CONNACK and PUBACK reason codes and
  server DISCONNECTs; a closed connection reconnects after --retry seconds.
* AMQP application `--app-user` (python-qpid-proton, as tests/interop): after --amqp-delay
  seconds, one --big-mib MiB event, one message whose body is a list nested --depth deep
  (hand-encoded with tests/hostile/hostile_wire.py, which no library would send), and
  --receivers receivers attached on fresh `command_response/TENANT/<uuid>` reply addresses
  (pipelined in batches, kept attached until the end), all three at once (--attacks picks
  some of them; --connections 0 leaves MQTT out).

Runs until --duration or SIGTERM/SIGINT, then prints one JSON line of results on stdout
(times are seconds since ready). `ready` (and --ready-file) once the first round of MQTT
CONNECTs has been answered. Needs python-qpid-proton for the AMQP part.
"""
import argparse
import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "hostile"))

STOP = threading.Event()
T_READY = [None]


def since_ready():
    return round(time.monotonic() - T_READY[0], 3) if T_READY[0] else None


def log(msg):
    print(f"[hostile] {msg}", file=sys.stderr, flush=True)


def bump(d, key, n=1):
    d[key] = d.get(key, 0) + n


# ---------------------------------------------------------------------------------------
# MQTT 5, just enough of it

def varint(n):
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def connect_packet(client_id, user, password, keepalive=60):
    # protocol name, level 5, flags: username, password, clean start; no properties
    body = utf8("MQTT") + bytes([5, 0xC2]) + struct.pack(">H", keepalive) + b"\x00"
    body += utf8(client_id) + utf8(user) + utf8(password)
    return b"\x10" + varint(len(body)) + body


def publish_packet(topic, packet_id, payload):
    body = utf8(topic) + struct.pack(">H", packet_id) + b"\x00" + payload
    return b"\x32" + varint(len(body)) + body


PROP_SIZES = {}  # property id -> fixed size, or a reader
for _i in (0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A):
    PROP_SIZES[_i] = 1
for _i in (0x13, 0x21, 0x22, 0x23):
    PROP_SIZES[_i] = 2
for _i in (0x02, 0x11, 0x18, 0x27):
    PROP_SIZES[_i] = 4


def read_varint(buf, pos):
    n, mult = 0, 1
    for k in range(4):
        if pos + k >= len(buf):
            return None, pos
        b = buf[pos + k]
        n += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            return n, pos + k + 1
    raise ValueError("malformed variable byte integer")


def properties(buf):
    """MQTT 5 properties (the bytes after the length) as {id: value}."""
    out, pos = {}, 0
    while pos < len(buf):
        pid = buf[pos]
        pos += 1
        if pid in PROP_SIZES:
            size = PROP_SIZES[pid]
            out[pid] = int.from_bytes(buf[pos:pos + size], "big")
            pos += size
        elif pid == 0x0B:
            out[pid], pos = read_varint(buf, pos)
        elif pid == 0x26:  # user property: two strings
            for _ in range(2):
                pos += 2 + struct.unpack(">H", buf[pos:pos + 2])[0]
        else:  # strings and binary data
            n = struct.unpack(">H", buf[pos:pos + 2])[0]
            out[pid] = buf[pos + 2:pos + 2 + n]
            pos += 2 + n
    return out


class Device:
    def __init__(self, index, args):
        self.index = index
        self.user = args.username.replace("{i}", str(index))
        self.client_id = f"hostile-{os.getpid()}-{index}"
        self.sock = None
        self.state = "idle"  # idle -> connecting -> connected -> idle
        self.inbuf = b""
        self.outbuf = b""
        self.inflight = 0
        self.window = 16
        self.next_id = 0
        self.retry_at = 0.0
        self.mask = 0


class Flood:
    """Every MQTT device of the tenant, on one selector."""

    def __init__(self, args):
        self.args = args
        host, port = args.mqtt.rsplit(":", 1)
        self.addr = (host, int(port))
        self.sel = selectors.DefaultSelector()
        self.devices = [Device(i, args) for i in range(args.connections)]
        self.payload = b"x" * max(args.size, 8)
        self.topic = "telemetry"
        self.stats = {"connect_attempts": 0, "connack": {}, "puback": {}, "server_disconnect": {},
                      "closed_without_disconnect": 0, "pubacks": 0, "connect_errors": {},
                      "most_connected_at_once": 0}
        self.sent = 0

    def connected(self):
        return [d for d in self.devices if d.state == "connected"]

    def open(self, d, now):
        self.stats["connect_attempts"] += 1
        try:
            s = socket.create_connection(self.addr, timeout=5)
        except OSError as e:
            bump(self.stats["connect_errors"], type(e).__name__)
            d.retry_at = now + self.args.retry
            return
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        d.sock, d.state, d.inbuf, d.inflight, d.window = s, "connecting", b"", 0, 16
        d.outbuf = connect_packet(d.client_id, d.user, self.args.password)
        d.mask = selectors.EVENT_READ | selectors.EVENT_WRITE
        self.sel.register(s, d.mask, d)

    def close(self, d, now, why=None):
        if why == "eof":
            self.stats["closed_without_disconnect"] += 1
        if d.sock:
            try:
                self.sel.unregister(d.sock)
            except (KeyError, ValueError):
                pass
            d.sock.close()
        d.sock, d.state, d.outbuf = None, "idle", b""
        d.retry_at = now + self.args.retry

    def packet(self, d, first, body, now):
        kind = first >> 4
        if kind == 2:  # CONNACK: flags, reason code, properties
            rc = body[1] if len(body) > 1 else 0
            bump(self.stats["connack"], f"0x{rc:02x}")
            if rc != 0:
                self.close(d, now)
                return
            if len(body) > 2:
                n, pos = read_varint(body, 2)
                props = properties(body[pos:pos + n])
                d.window = max(1, min(16, props.get(0x21, 16)))
            d.state = "connected"
            self.stats["most_connected_at_once"] = max(self.stats["most_connected_at_once"], len(self.connected()))
        elif kind == 4:  # PUBACK: packet id, [reason code]
            rc = body[2] if len(body) > 2 else 0
            bump(self.stats["puback"], f"0x{rc:02x}")
            d.inflight = max(0, d.inflight - 1)
        elif kind == 14:  # DISCONNECT from the server
            rc = body[0] if body else 0
            bump(self.stats["server_disconnect"], f"0x{rc:02x}")
            self.close(d, now)

    def read(self, d, now):
        try:
            data = d.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close(d, now, "eof")
            return
        d.inbuf += data
        while d.sock is not None and len(d.inbuf) >= 2:
            n, pos = read_varint(d.inbuf, 1)
            if n is None or len(d.inbuf) < pos + n:
                return
            first, body = d.inbuf[0], d.inbuf[pos:pos + n]
            d.inbuf = d.inbuf[pos + n:]
            self.packet(d, first, body, now)

    def write(self, d, now):
        if not d.outbuf:
            return
        try:
            n = d.sock.send(d.outbuf)
            d.outbuf = d.outbuf[n:]
        except BlockingIOError:
            pass
        except OSError:
            self.close(d, now, "eof")

    def fill(self, now, start):
        """The publishes due by now, spread over the connections with room in their window."""
        due = int((now - start) * self.args.rate) - self.sent
        if due <= 0:
            return
        ready = [d for d in self.connected() if d.inflight < d.window and len(d.outbuf) < 65536]
        while due > 0 and ready:
            for d in list(ready):
                if due <= 0:
                    break
                d.next_id = d.next_id % 65535 + 1
                d.outbuf += publish_packet(self.topic, d.next_id, self.payload)
                d.inflight += 1
                self.sent += 1
                due -= 1
                if d.inflight >= d.window:
                    ready.remove(d)
        # What could not be sent for want of window is not owed later (no catch-up burst).
        self.sent += max(due, 0)

    def run(self, ready_cb):
        now = time.monotonic()
        for d in self.devices:
            self.open(d, now)
        first_round = time.monotonic() + 10
        announced = False
        start = time.monotonic()
        while not STOP.is_set():
            now = time.monotonic()
            if not announced and (all(d.state != "connecting" for d in self.devices) or now > first_round):
                announced = True
                start = now
                self.sent = 0
                ready_cb()
            for d in self.devices:
                if d.state == "idle" and now >= d.retry_at:
                    self.open(d, now)
            if announced:
                self.fill(now, start)
            for d in self.devices:
                if d.sock is not None:
                    mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if d.outbuf else 0)
                    if mask != d.mask:
                        self.sel.modify(d.sock, mask, d)
                        d.mask = mask
            for key, events in self.sel.select(0.005):
                d = key.data
                if events & selectors.EVENT_READ and d.sock is not None:
                    self.read(d, now)
                if events & selectors.EVENT_WRITE and d.sock is not None:
                    self.write(d, now)
        self.stats["pubacks"] = sum(self.stats["puback"].values())
        self.stats["seconds"] = round(time.monotonic() - start, 3)
        for d in self.devices:
            if d.sock is not None:
                try:
                    d.sock.setblocking(True)
                    d.sock.settimeout(0.5)
                    d.sock.sendall(b"\xe0\x00")
                except OSError:
                    pass
                d.sock.close()


# ---------------------------------------------------------------------------------------
# AMQP application

def amqp_url(args):
    host, port = args.amqp.rsplit(":", 1)
    from urllib.parse import quote
    return f"amqp://{quote(args.app_user, safe='')}:{quote(args.app_password, safe='')}@{host}:{port}"


def connect(args, timeout=10):
    from proton.utils import BlockingConnection
    return BlockingConnection(amqp_url(args), timeout=timeout, allowed_mechs="PLAIN", allow_insecure_mechs=True)


def condition_of(e):
    """The AMQP error condition in an exception's text (amqp:...), else its type."""
    text = str(e)
    for word in text.replace(",", " ").replace("'", " ").replace('"', " ").split():
        if word.startswith("amqp:"):
            return word.rstrip(":.)")
    return type(e).__name__


def big_message(args, out):
    from proton import Message
    out["started"] = since_ready()
    conn = None
    try:
        conn = connect(args, timeout=30)
        sender = conn.create_sender(f"event/{args.tenant}", name="big")
        sender.send(Message(body=b"x" * (args.big_mib * 1024 * 1024), durable=True), timeout=30)
        out["outcome"] = "accepted"
    except Exception as e:  # LinkDetached, SendException, Timeout, ConnectionException
        out["outcome"] = f"{type(e).__name__}: {condition_of(e)}"
        out["refused"] = condition_of(e).startswith("amqp:")
    finally:
        out["ended"] = since_ready()
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


def nested_body(args, out):
    from hostile_wire import RawAmqp, amqp_value_section, nested_list
    out["started"] = since_ready()
    amqp = RawAmqp(args.amqp)
    try:
        amqp.sasl_plain(args.app_user, args.app_password)
        amqp.open()
        amqp.begin()
        amqp.attach_sender(f"telemetry/{args.tenant}")
        payload = amqp_value_section(nested_list(args.depth))
        out["bytes"] = len(payload)
        out["frames"] = amqp.send_delivery(payload, delivery_id=0)
        out["outcome"] = amqp.outcome(10)
    except (ConnectionResetError, BrokenPipeError) as e:
        out["outcome"] = f"reset ({e})"
    except Exception as e:
        out["outcome"] = f"{type(e).__name__}: {e}"
    finally:
        amqp.close()
        out["ended"] = since_ready()
    o = out["outcome"]
    out["refused"] = o == "eof" or o.startswith(("reset", "detach:", "end:", "close:", "disposition:rejected"))


def pump(conn, condition, timeout):
    """Processes the connection's events until `condition()` (True) or `timeout` (False).
    The blocking API raises LinkDetached for every link the server detaches (a refused
    attach): those are counted from the links' state afterwards."""
    from proton import Timeout
    from proton.utils import LinkDetached
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.wait(condition, timeout=max(0.001, deadline - time.monotonic()))
            return True
        except LinkDetached:
            if time.monotonic() > deadline:
                return False
        except Timeout:
            return False


def receivers(args, out):
    """Attaches receivers on fresh reply addresses, --batch attaches in flight at a time,
    and keeps the ones the server let in until the end."""
    from proton import Endpoint
    out.update(started=since_ready(), attached=0, refused={}, no_answer=0, connections=0, errors={})
    held = []  # (connection, links)
    asked = 0
    while asked < args.receivers and not STOP.is_set() and out["connections"] < 10:
        try:
            conn = connect(args)
        except Exception as e:
            bump(out["errors"], f"connect: {type(e).__name__}")
            if STOP.wait(0.5):
                break
            continue
        out["connections"] += 1
        links = []
        held.append((conn, links))
        try:
            while asked < args.receivers and not STOP.is_set():
                batch = []
                for _ in range(min(args.batch, args.receivers - asked)):
                    batch.append(conn.container.create_receiver(
                        conn.conn, f"command_response/{args.tenant}/{uuid.uuid4()}", name=f"r{asked}"))
                    asked += 1
                links.extend(batch)
                if not pump(conn, lambda: all(not (l.state & Endpoint.REMOTE_UNINIT) for l in batch), 10):
                    bump(out["errors"], "attach batch unanswered within 10 s")
        except Exception as e:  # the connection went away
            bump(out["errors"], condition_of(e))
    out["asked"] = asked
    out["attach_ended"] = since_ready()
    # Let the last detaches come in, then count; the links stay attached until STOP.
    for conn, _ in held:
        try:
            pump(conn, lambda: False, 0.5)
        except Exception:
            pass
    for conn, links in held:
        for link in links:
            if link.state & Endpoint.REMOTE_UNINIT:
                out["no_answer"] += 1
            elif link.state & Endpoint.REMOTE_CLOSED:
                cond = link.remote_condition.name if link.remote_condition else "detached without error"
                bump(out["refused"], cond)
            elif link.remote_source is None or link.remote_source.address is None:
                bump(out["refused"], "attach without source")
            else:
                out["attached"] += 1
    out["ended"] = since_ready()
    STOP.wait()
    for conn, _ in held:
        try:
            conn.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mqtt", required=True)
    ap.add_argument("--amqp", required=True)
    ap.add_argument("--tenant", required=True)
    ap.add_argument("--username", help="MQTT username template (default dev{i}@TENANT)")
    ap.add_argument("--password", required=True, help="the devices' password")
    ap.add_argument("--connections", type=int, default=30)
    ap.add_argument("--rate", type=float, default=5000, help="attempted telemetry msgs/s over all connections")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--retry", type=float, default=1.0, help="seconds before a refused or closed device reconnects")
    ap.add_argument("--app-user", required=True)
    ap.add_argument("--app-password", required=True)
    ap.add_argument("--amqp-delay", type=float, default=1.0, help="seconds after ready before the AMQP attacks")
    ap.add_argument("--big-mib", type=int, default=64)
    ap.add_argument("--depth", type=int, default=50_000)
    ap.add_argument("--receivers", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=200, help="receiver attaches in flight at once")
    ap.add_argument("--attacks", default="big,nested,receivers", help="AMQP attacks to run (comma-separated; '' for none)")
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--ready-file")
    args = ap.parse_args()
    args.username = args.username or f"dev{{i}}@{args.tenant}"

    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    signal.signal(signal.SIGINT, lambda *_: STOP.set())
    results = {"kind": "hostile-tenant", "tenant": args.tenant}
    attacks = {"big_message": {}, "nested_body": {}, "receivers": {}}
    threads = []

    def amqp_attacks():
        if STOP.wait(args.amqp_delay):
            return
        for name, fn in (("big_message", big_message), ("nested_body", nested_body), ("receivers", receivers)):
            if name.split("_")[0] not in args.attacks.split(","):
                continue
            def guarded(fn=fn, out=attacks[name]):
                try:
                    fn(args, out)
                except Exception as e:
                    out["error"] = f"{type(e).__name__}: {e}"
            t = threading.Thread(target=guarded, daemon=True)
            t.start()
            threads.append(t)

    def ready():
        T_READY[0] = time.monotonic()
        log("ready")
        if args.ready_file:
            tmp = args.ready_file + ".tmp"
            Path(tmp).write_text("ready")
            os.rename(tmp, args.ready_file)
        if args.attacks:
            threading.Thread(target=amqp_attacks, daemon=True).start()
        threading.Timer(args.duration, STOP.set).start()

    flood = Flood(args)
    try:
        flood.run(ready)
    except Exception as e:
        results["mqtt_error"] = f"{type(e).__name__}: {e}"
    results["stopped"] = since_ready()
    for t in list(threads):
        t.join(3)
    results["mqtt"] = flood.stats
    results["mqtt"]["attempted_rate"] = args.rate
    if args.attacks:
        results["amqp"] = {k: v for k, v in attacks.items() if v}
    print(json.dumps(results), flush=True)
    os._exit(0)  # proton objects of the daemon threads are not worth an orderly shutdown


if __name__ == "__main__":
    main()
