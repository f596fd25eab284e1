#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ (committed; run again after a
change here). Standard library only: every input is encoded here from the protocol
specifications (AMQP 1.0, RFC 7252/7959 CoAP, RFC 6347 DTLS, Hono's topic and URI
schemes), except the DTLS flights in DTLS_CAPTURED, which are what OpenSSL's `s_client`
sent in a PSK handshake on localhost (`--capture-dtls` records them again, and prints
them for this file).

    python3 fuzz/make-corpus.py                 # rewrite fuzz/corpus/
    python3 fuzz/make-corpus.py --capture-dtls  # needs openssl; prints new DTLS_CAPTURED
"""

import base64
import os
import shutil
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")

# ---------------------------------------------------------------------------- AMQP 1.0
# Primitive encodings (AMQP 1.0 part 1, section 1.6).
NULL = b"\x40"
TRUE, FALSE = b"\x41", b"\x42"


def unsigned(zero, small, wide, fmt):
    """The encoder of an unsigned type with a zero-width form for 0 and a one-byte form."""
    def encode(n):
        if n == 0:
            return zero
        if n < 256:
            return small + bytes([n])
        return wide + struct.pack(fmt, n)
    return encode


uint = unsigned(b"\x43", b"\x52", b"\x70", ">I")
ulong = unsigned(b"\x44", b"\x53", b"\x80", ">Q")


def ubyte(n):
    return b"\x50" + bytes([n])


def ushort(n):
    return b"\x60" + struct.pack(">H", n)


def int_(n):
    if -128 <= n < 128:
        return b"\x54" + struct.pack(">b", n)
    return b"\x71" + struct.pack(">i", n)


def variable(small, wide, b):
    """A variable-width value: one-byte length (below 256 bytes) or four-byte length."""
    return (small + bytes([len(b)]) if len(b) < 256 else wide + struct.pack(">I", len(b))) + b


def string(s):
    return variable(b"\xa1", b"\xb1", s.encode())


def symbol(s):
    b = s.encode()
    return b"\xa3" + bytes([len(b)]) + b


def binary(b):
    return variable(b"\xa0", b"\xb0", b)


def timestamp(ms):
    return b"\x83" + struct.pack(">q", ms)


def list_(items):
    if not items:
        return b"\x45"
    body = b"".join(items)
    if len(body) + 1 < 256 and len(items) < 256:
        return b"\xc0" + bytes([len(body) + 1, len(items)]) + body
    return b"\xd0" + struct.pack(">II", len(body) + 4, len(items)) + body


def map_(pairs):
    body = b"".join(k + v for k, v in pairs)
    count = 2 * len(pairs)
    if len(body) + 1 < 256:
        return b"\xc1" + bytes([len(body) + 1, count]) + body
    return b"\xd1" + struct.pack(">II", len(body) + 4, count) + body


def array_sym(symbols):
    """array8 of sym8 (one constructor, then bodies)."""
    body = b"".join(bytes([len(s)]) + s.encode() for s in symbols)
    return b"\xe0" + bytes([len(body) + 2, len(symbols)]) + b"\xa3" + body


def described(code, fields):
    """A composite type: descriptor ulong, then its fields as a list (trailing nulls cut)."""
    while fields and fields[-1] == NULL:
        fields = fields[:-1]
    return b"\x00" + ulong(code) + list_(fields)


def section(code, value):
    return b"\x00" + ulong(code) + value


# Performatives (part 2, section 2.7) and SASL frames (part 5, section 5.3.3).
def open_(container):
    return described(0x10, [string(container), string("localhost"), uint(65536), ushort(255), uint(60000)])


def begin():
    return described(0x11, [NULL, uint(0), uint(2048), uint(2048), uint(255)])


def attach(name, handle, role, address):
    source = described(0x28, [string(address)] if role else [])
    target = described(0x29, [] if role else [string(address)])
    return described(0x12, [string(name), uint(handle), TRUE if role else FALSE, ubyte(0), ubyte(0), source, target,
                            NULL, NULL, NULL if role else uint(0)])


def flow(handle, credit):
    return described(0x13, [uint(0), uint(2048), uint(0), uint(2048), uint(handle), uint(0), uint(credit)])


def transfer(handle, delivery_id, tag, more=False, settled=False):
    return described(0x14, [uint(handle), uint(delivery_id), binary(tag), uint(0), TRUE if settled else FALSE,
                            TRUE if more else FALSE])


def disposition(first):
    accepted = described(0x24, [])
    return described(0x15, [TRUE, uint(first), NULL, TRUE, accepted])


def detach(handle):
    return described(0x16, [uint(handle), TRUE])


def end():
    return described(0x17, [])


def close():
    return described(0x18, [])


def sasl_init(mechanism, response):
    return described(0x41, [symbol(mechanism), binary(response), string("localhost")])


def frame(body, channel=0, kind=0):
    return struct.pack(">IBBH", 8 + len(body), 2, kind, channel) + body


AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
SASL_HEADER = b"AMQP\x03\x01\x00\x00"
HEARTBEAT = frame(b"")


def telemetry_message():
    """What an application or a Hono client sends: properties, application properties and
    one data section."""
    properties = described(0x73, [string("m-1"), NULL, string("telemetry/acme"), string("reading"), NULL, NULL,
                                  symbol("application/json"), NULL, NULL, timestamp(1_700_000_000_000)])
    app = section(0x74, map_([(string("device_id"), string("sensor-1")), (string("x-ferrule-defer-ttl"), int_(30))]))
    annotations = section(0x72, map_([(symbol("x-opt-retain"), TRUE)]))
    header = described(0x70, [TRUE, ubyte(4), uint(30000)])
    return header + annotations + properties + app + section(0x75, binary(b'{"temp": 21.5}'))


def command_message():
    """A request/response command to `command/acme` (Hono's command format)."""
    properties = described(0x73, [string("cmd-7"), NULL, string("command/acme/sensor-1"), string("switch"),
                                  string("command_response/acme/app-1"), ulong(42), symbol("text/plain")])
    return properties + section(0x77, string("on"))


def value_message():
    """An amqp-value body with a list, a map and a string (nested, within the limit)."""
    value = list_([int_(1), map_([(symbol("k"), list_([NULL, TRUE, ushort(7)]))]), string("x"),
                   array_sym(["a", "bc"])])
    return section(0x77, value)


def nested_lists(depth):
    out = b"\x45"
    for _ in range(depth):
        out = b"\xd0" + struct.pack(">II", len(out) + 4, 1) + out
    return out


def amqp_seeds():
    msg = telemetry_message()
    scan = {
        "message-telemetry": msg,
        "message-command": command_message(),
        "message-value": value_message(),
        # The deepest accepted: the amqp-value section is one level, 31 lists the rest.
        "message-depth-limit": section(0x77, nested_lists(31)),
        "message-too-deep": section(0x77, nested_lists(40)),
        # Four billion zero-width elements in a nine-byte array.
        "array-of-nulls": b"\xf0" + struct.pack(">II", 5, 0xFFFFFFFF) + b"\x40",
        "described-symbol-array": b"\xe0\x08\x02\x00\x53\x01\xa3\x01a\x00",
        "performative-attach": attach("sender-1", 0, False, "telemetry/acme"),
        "performative-transfer": transfer(0, 0, b"\x00\x01"),
        "performative-open": open_("app-1"),
    }
    half = len(msg) // 2
    stream = (SASL_HEADER + frame(sasl_init("PLAIN", b"\x00app@acme\x00secret"), kind=1) + AMQP_HEADER
              + frame(open_("app-1")) + frame(begin()) + frame(attach("sender-1", 0, False, "telemetry/acme"))
              + frame(transfer(0, 0, b"\x00", settled=True) + msg)
              # One message over two frames, another link's delivery in between.
              + frame(attach("sender-2", 1, False, "command/acme"))
              + frame(transfer(0, 1, b"\x01", more=True) + msg[:half])
              + frame(transfer(1, 2, b"\x02") + command_message())
              + frame(transfer(0, 1, b"\x01") + msg[half:])
              + frame(attach("receiver-1", 2, True, "event/acme")) + frame(flow(2, 100)) + HEARTBEAT
              + frame(disposition(1)) + frame(detach(0)) + frame(end()) + frame(close()))
    anonymous = (SASL_HEADER + frame(sasl_init("ANONYMOUS", b""), kind=1) + AMQP_HEADER + frame(open_("app-2"))
                 + frame(begin(), channel=3) + frame(attach("r", 7, True, "telemetry/acme"), channel=3)
                 + frame(flow(7, 10), channel=3))
    deep_split = (AMQP_HEADER + frame(open_("x")) + frame(begin()) + frame(attach("s", 0, False, "telemetry/t"))
                  + frame(transfer(0, 0, b"a", more=True) + section(0x77, nested_lists(60))[:300])
                  + frame(transfer(0, 0, b"a") + section(0x77, nested_lists(60))[300:]))
    streams = {"session-sasl-plain": stream, "session-anonymous": anonymous, "split-too-deep": deep_split,
               "heartbeats": AMQP_HEADER + HEARTBEAT * 3}
    # amqp_frames: [chunk size - 1][limits] stream
    frames = {}
    for name, data in streams.items():
        frames[name] = bytes([15, 0]) + data
        frames[name + "-bytewise"] = bytes([0, 0]) + data
    frames["session-sasl-plain-small-limits"] = bytes([255, 1]) + stream
    return scan, frames, streams


# --------------------------------------------------------------------------- AMQP addresses
ADDRESSES = {
    "telemetry": b"telemetry/acme",
    "event": b"event/acme",
    "command": b"command/acme",
    "command-response": b"command_response/acme/app-1",
    "deferred": b"command_deferred/acme/sensor-1",
    "dynamic": b"dynamic/acme/3f2a",
    "configured-hash": b"fleet/acme/site-1/line-2",
    "configured-mid-hash": b"audit/acme/x/y/log",
    "configured-star": b"a/b/c",
    "empty-segment": b"telemetry//acme",
    "plain-tenant-user": b"\x00app@t1\x00secret",
    "plain-wildcard-user": b"admin\x00ops@t9\x00root",
    "plain-wrong": b"\x00app@t1\x00wrong",
}


# ------------------------------------------------------------------------------ DTLS
def dtls_record(content, epoch, seq, body, version=b"\xfe\xfd"):
    return bytes([content]) + version + struct.pack(">H", epoch) + seq.to_bytes(6, "big") + struct.pack(">H", len(body)) + body


def handshake(kind, seq, message, offset=0, fragment=None):
    fragment = message if fragment is None else fragment
    return (bytes([kind]) + len(message).to_bytes(3, "big") + struct.pack(">H", seq) + offset.to_bytes(3, "big")
            + len(fragment).to_bytes(3, "big") + fragment)


def client_hello(cookie=b"", suites=(0xC0A8,), extensions=None, session=b""):
    out = b"\xfe\xfd" + bytes(range(32)) + bytes([len(session)]) + session + bytes([len(cookie)]) + cookie
    out += struct.pack(">H", 2 * len(suites)) + b"".join(struct.pack(">H", s) for s in suites) + b"\x01\x00"
    if extensions is not None:
        out += struct.pack(">H", len(extensions)) + extensions
    return out


# What OpenSSL 3.0 `s_client -dtls1_2 -psk ... -psk_identity sensor-1@acme -cipher
# PSK-AES128-CCM8:PSK-AES128-GCM-SHA256` sent (run with --capture-dtls to record anew):
# ClientHello, ClientHello with the server's cookie, ClientKeyExchange + ChangeCipherSpec +
# encrypted Finished, and one application data record.
DTLS_CAPTURED = {
    "openssl-client-hello": "16feff000000000000000000760100006a000000000000006afefd2f16951703f771961d1ada6b29adba4a9c5493140880eedf26794d0dce06a04500000006c0a800a800ff0100003a002300000016000000170000000d002a0028040305030603080708080809080a080b080408050806040105010601030303010302040205020602",
    "openssl-client-hello-cookie": "16feff0000000000000001008a0100007e000100000000007efefd2f16951703f771961d1ada6b29adba4a9c5493140880eedf26794d0dce06a0450014dde4423d1f90c290e8d908482136682f404b79030006c0a800a800ff0100003a002300000016000000170000000d002a0028040305030603080708080809080a080b080408050806040105010601030303010302040205020602",
    "openssl-flight-5": "16fefd0000000000000002001b1000000f000200000000000f000d73656e736f722d314061636d6514fefd000000000000000300010116fefd000100000000000000280001000000000000d816a2a6695a692ff9cd69559fe054dadc300862aa36f148cff2e09225033779",
    "openssl-application-data": "17fefd000100000000000100160001000000000001f81d9510be67e802d0861171861b",
}


def capture_dtls():
    """Runs OpenSSL's DTLS PSK server and client on localhost through a recording relay."""
    import socket
    import subprocess
    import threading
    import time

    psk = ["-psk", "00112233445566778899aabbccddeeff", "-psk_identity", "sensor-1@acme",
           "-cipher", "PSK-AES128-CCM8:PSK-AES128-GCM-SHA256", "-quiet"]
    server_port, relay_port = 25684, 25685
    server = subprocess.Popen(["openssl", "s_server", "-dtls1_2", "-accept", f"127.0.0.1:{server_port}", "-nocert"] + psk,
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    relay.bind(("127.0.0.1", relay_port))
    relay.settimeout(0.2)
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.connect(("127.0.0.1", server_port))
    upstream.settimeout(0.05)
    recorded, client = [], [None]

    def pump():
        deadline = time.time() + 6
        while time.time() < deadline:
            try:
                data, client[0] = relay.recvfrom(65535)
                recorded.append(data)
                upstream.send(data)
            except socket.timeout:
                pass
            try:
                while True:
                    data = upstream.recv(65535)
                    if client[0]:
                        relay.sendto(data, client[0])
            except socket.timeout:
                pass

    thread = threading.Thread(target=pump)
    thread.start()
    cli = subprocess.Popen(["openssl", "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{relay_port}"] + psk,
                           stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)
    cli.stdin.write(b"hello\n")
    cli.stdin.flush()
    time.sleep(2)
    cli.kill()
    thread.join()
    server.kill()
    print("DTLS_CAPTURED = {")
    for name, data in zip(DTLS_CAPTURED, recorded):
        print(f'    "{name}": "{data.hex()}",')
    print("}")


def dtls_seeds():
    seeds = {name: bytes.fromhex(data) for name, data in DTLS_CAPTURED.items()}
    # A PSK client that sends no extensions (tinydtls/libcoap style), first and second flight.
    hello = client_hello()
    seeds["client-hello-plain"] = dtls_record(22, 0, 0, handshake(1, 0, hello))
    seeds["client-hello-cookie"] = dtls_record(22, 0, 1, handshake(1, 1, client_hello(cookie=bytes(range(16)))))
    seeds["client-hello-extensions"] = dtls_record(22, 0, 0, handshake(1, 0, client_hello(
        suites=(0xC0A8, 0x00A8, 0xC0A4), extensions=b"\x00\x17\x00\x00\xff\x01\x00\x01\x00")))
    identity = b"sensor-1@acme"
    cke = struct.pack(">H", len(identity)) + identity
    seeds["flight-5"] = (dtls_record(22, 0, 2, handshake(16, 2, cke)) + dtls_record(20, 0, 3, b"\x01")
                         + dtls_record(22, 1, 0, bytes(range(40))))
    seeds["two-messages-one-record"] = dtls_record(22, 0, 0, handshake(1, 0, hello) + handshake(16, 1, cke))
    seeds["application-data"] = dtls_record(23, 1, 1, bytes(29))
    seeds["alert-close-notify"] = dtls_record(21, 1, 2, bytes(26))
    # Refused: a fragment (security review C1), a session id, an oversized encrypted record.
    seeds["fragment"] = dtls_record(22, 0, 0, handshake(1, 0, hello, 5, hello[5:6]))
    seeds["session-id"] = dtls_record(22, 0, 0, handshake(1, 0, client_hello(session=bytes(32))))
    seeds["extensions-block-too-short"] = dtls_record(22, 0, 0, handshake(1, 0, client_hello(extensions=b"\x00")))
    seeds["psk-identity"] = identity
    seeds["client-hello-message"] = hello
    return seeds


# ------------------------------------------------------------------------------ CoAP
CON, NON, ACK, RST = 0, 1, 2, 3
GET, POST, PUT = 1, 2, 3
URI_HOST, URI_PATH, CONTENT_FORMAT, URI_QUERY, ACCEPT, BLOCK1, SIZE1 = 3, 11, 12, 15, 17, 27, 60
REQUEST_TAG = 292


def coap_option_header(delta, length):
    def nibble(n):
        if n < 13:
            return n, b""
        if n < 269:
            return 13, bytes([n - 13])
        return 14, struct.pack(">H", n - 269)
    d, dx = nibble(delta)
    l, lx = nibble(length)
    return bytes([d << 4 | l]) + dx + lx


def coap(kind, code, message_id, token=b"", options=(), payload=b""):
    out = bytes([0x40 | kind << 4 | len(token), code]) + struct.pack(">H", message_id) + token
    last = 0
    for number, value in sorted(options, key=lambda o: o[0]):
        out += coap_option_header(number - last, len(value)) + value
        last = number
    if payload:
        out += b"\xff" + payload
    return out


def uint_option(n):
    b = n.to_bytes(4, "big").lstrip(b"\x00")
    return b


def path(*segments):
    return [(URI_PATH, s.encode()) for s in segments]


def query(*params):
    return [(URI_QUERY, p.encode()) for p in params]


def block1(num, more, szx):
    return (BLOCK1, uint_option(num << 4 | (8 if more else 0) | szx))


def request_id(tag, correlation, reply):
    raw = bytes([tag, len(correlation)]) + correlation + reply.encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


REQ_ID = request_id(0, b"cmd-7", "app-1")


def coap_seeds():
    json = b'{"temp": 21.5}'
    seeds = {
        "con-post-t-json": coap(CON, POST, 0x1001, b"\x01\x02", path("t") + [(CONTENT_FORMAT, uint_option(50))], json),
        "non-post-telemetry": coap(NON, POST, 0x1002, b"\x03", path("telemetry") + [(CONTENT_FORMAT, b"")], b"21.5"),
        "con-post-event-ttl": coap(CON, POST, 0x1003, b"\x04", path("event") + query("hono-ttl=30")
                                   + [(CONTENT_FORMAT, uint_option(60))], b"\xa1\x61t\x18\x15"),
        "con-put-gateway": coap(CON, PUT, 0x1004, b"\x05", path("telemetry", "acme", "sensor-1")
                                + [(CONTENT_FORMAT, uint_option(0))], b"21.5"),
        "con-post-empty-ttd": coap(CON, POST, 0x1005, b"\x06\x07\x08\x09", path("e") + query("empty", "hono-ttd=10")),
        "con-post-command-response": coap(CON, POST, 0x1006, b"\x0a", path("cr", REQ_ID) + query("hono-cmd-status=200")
                                          + [(CONTENT_FORMAT, uint_option(50))], b'{"ok": true}'),
        "con-put-command-response": coap(CON, PUT, 0x1007, b"\x0b", path("command_response", "acme", "sensor-1", REQ_ID)
                                         + query("hono-cmd-status=404")),
        "con-post-all-options": coap(CON, POST, 0x1008, b"\x0c", [(URI_HOST, b"ferrule.local")] + path("t")
                                     + [(ACCEPT, uint_option(50)), (SIZE1, uint_option(14)), (REQUEST_TAG, b"\x01")]
                                     + [(CONTENT_FORMAT, uint_option(11542))], json),
        "con-post-block1-first": coap(CON, POST, 0x1009, b"\x0d", path("t") + [block1(0, True, 0), (SIZE1, uint_option(40))],
                                      bytes(range(16))),
        "con-get-not-allowed": coap(CON, GET, 0x100a, b"", path("t")),
        "con-post-unknown-critical": coap(CON, POST, 0x100b, b"", path("t") + [(9, b"x")], b"x"),
        "ping": coap(CON, 0, 0x100c),
        "ack": coap(ACK, 0, 0x100d),
        "rst": coap(RST, 0, 0x100e),
        "marker-without-payload": coap(CON, POST, 0x100f, b"", path("t")) + b"\xff",
    }
    # coap_block1: [control: clock advance << 2 | peer][length: u16][datagram] records.
    def record(peer, seconds, datagram):
        return bytes([seconds << 2 | peer]) + struct.pack(">H", len(datagram)) + datagram

    def upload(peer, message_id, blocks, szx=0, seconds=0, extra=()):
        """The records of one block-wise upload of `blocks` blocks (the last one short)."""
        size = 16 << szx
        body = bytes((i * 7) & 0xFF for i in range(size * (blocks - 1) + 5))
        out = []
        for num in range(blocks):
            chunk = body[num * size:(num + 1) * size]
            options = path("t") + [block1(num, num < blocks - 1, szx)] + list(extra)
            if num == 0:
                options += [(CONTENT_FORMAT, uint_option(42)), (SIZE1, uint_option(len(body)))]
            out.append(record(peer, seconds, coap(CON, POST, message_id + num, bytes([peer, num]), options, chunk)))
        return out

    def cat(*uploads):
        return b"".join(b"".join(u) for u in uploads)

    interleaved = [r for pair in zip(upload(1, 0x3000, 3, szx=1), upload(2, 0x4000, 3, szx=2)) for r in pair]
    blocks = {
        "three-blocks": cat(upload(0, 0x2000, 3)),
        "two-peers-interleaved": b"".join(interleaved),
        "restart-and-expire": cat(upload(3, 0x5000, 2), upload(3, 0x5100, 1, seconds=63), upload(3, 0x5200, 3, seconds=63)),
        "request-tags": cat(upload(0, 0x6000, 2, extra=[(REQUEST_TAG, b"\x01")]),
                            upload(0, 0x6100, 2, extra=[(REQUEST_TAG, b"\x02")])),
        "out-of-order": cat(upload(1, 0x7000, 3)[1:], upload(1, 0x7100, 2)),
        "too-large": record(2, 0, coap(CON, POST, 0x8000, b"", path("t") + [block1(0, True, 6), (SIZE1, uint_option(1 << 20))],
                                        bytes(1024))),
        "command-response": b"".join(
            record(0, 0, coap(CON, POST, 0x9000 + num, b"", path("cr", REQ_ID) + query("hono-cmd-status=200")
                              + [block1(num, more, 0)], bytes(16) if more else b"done"))
            for num, more in [(0, True), (1, False)]),
    }
    return seeds, blocks


# ------------------------------------------------------------------------ MQTT and HTTP
def mqtt_seeds():
    topics = [
        "telemetry", "t", "event", "e", "telemetry/acme/sensor-1", "t//sensor-1", "event/acme/sensor-1",
        "e/?content-type=application%2Fjson&hono-ttl=30&seq+no=7",
        "t/acme/sensor-1/?on-error=ignore&correlation-id=abc%20def",
        "telemetry/?on-error=skip-ack&content-type=text/plain;charset=utf-8",
        "command///req/#", "c///q/#", "command//+/req/#", "c/acme/sensor-1/q/#",
        "error///#", "e//+/#", "error/acme/sensor-1/#",
        f"command///res/{REQ_ID}/200", f"c//sensor-1/s/{REQ_ID}/404/?content-type=text%2Fplain",
        f"command/acme//res/{request_id(1, struct.pack('>Q', 42), 'app-1/x')}/500",
        "sensor-1@acme", "gw@acme@tenant-2",
    ]
    return {f"topic-{i:02}": t.encode() for i, t in enumerate(topics)}


def http_seeds():
    requests = [
        ["POST", "/telemetry", "", "1", "", "", "", "sensor-1@acme"],
        ["POST", "/event", "", "", "60", "", "", "sensor-1@acme"],
        ["PUT", "/telemetry/acme/dev%201", "hono-ttd=30", "0", "", "", "", "gw@acme"],
        ["PUT", "/event/acme/sensor-1", "", "", "", "10", "", ""],
        ["POST", "/telemetry", "a=1&hono-ttd=5", "", "", "", "", "sensor-1@acme"],
        ["POST", f"/command/res/{REQ_ID}", "hono-cmd-status=200", "", "", "", "", "sensor-1@acme"],
        ["PUT", f"/command/res/acme/sensor-1/{REQ_ID}", "", "", "", "", "503", "gw@acme"],
        ["GET", "/telemetry", "", "2", "soon", "-1", "42", "nobody"],
    ]
    return {f"request-{i:02}": "\n".join(r).encode() for i, r in enumerate(requests)}


def request_id_seeds():
    return {
        "string": REQ_ID.encode(),
        "ulong": request_id(1, struct.pack(">Q", 42), "app-1/x").encode(),
        "uuid": request_id(2, bytes(range(16)), "app-2").encode(),
        "binary": request_id(3, b"\x00\xff\x03", "reply").encode(),
        "long-string": request_id(0, b"c" * 255, "r" * 40).encode(),
    }


# ------------------------------------------------------------------------------ main
def write(target, seeds):
    directory = os.path.join(CORPUS, target)
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    for name, data in sorted(seeds.items()):
        if data is None:
            continue
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    print(f"{target}: {len(os.listdir(directory))} seeds")


def main():
    if sys.argv[1:] == ["--capture-dtls"]:
        capture_dtls()
        return
    scan, frames, streams = amqp_seeds()
    write("amqp_scan", scan)
    write("amqp_frames", frames)
    write("amqp_decode", streams)
    write("amqp_address", ADDRESSES)
    write("dtls_front", dtls_seeds())
    coap_request, coap_block1 = coap_seeds()
    write("coap_request", coap_request)
    write("coap_block1", coap_block1)
    write("mqtt_topic", mqtt_seeds())
    write("http_request", http_seeds())
    write("request_id", request_id_seeds())


if __name__ == "__main__":
    main()
