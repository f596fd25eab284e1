"""Byte builders for the hostile-input tests: DTLS 1.2 records and handshake fragments,
CoAP requests, and a hand-rolled AMQP 1.0 client (SASL PLAIN, open, begin, attach,
transfer). Nothing here is a real protocol implementation: each builder writes exactly the
bytes an attacker would, so the tests control every field (including the ones a
well-behaved library refuses to get wrong).

References: RFC 6347 §4.1/§4.2.2 (DTLS records, handshake fragments), RFC 5246 §7.4.1.2
(ClientHello), RFC 7252 §3 (CoAP message format), RFC 7959 §2.2 (Block1), OASIS AMQP 1.0
parts 1 (types), 2 (transport) and 5 (SASL).
"""
import os
import socket
import struct
import time
from typing import NamedTuple

# --------------------------------------------------------------------------------------
# DTLS 1.2
# --------------------------------------------------------------------------------------

DTLS_1_2 = b"\xfe\xfd"
CONTENT_HANDSHAKE = 22
CONTENT_ALERT = 21
HS_CLIENT_HELLO = 1
HS_SERVER_HELLO = 2
HS_HELLO_VERIFY_REQUEST = 3
RECORD_HEADER_LEN = 13  # type, version(2), epoch(2), sequence(6), length(2)
HANDSHAKE_HEADER_LEN = 12  # type, length(3), message_seq(2), fragment_offset(3), fragment_length(3)
TLS_PSK_WITH_AES_128_CCM_8 = 0xC0A8  # the suite RFC 7252 §9.1.3.1 makes mandatory
TLS_PSK_WITH_AES_128_GCM_SHA256 = 0x00A8
# webrtc-dtls reads each datagram into an 8 KiB buffer (conn/mod.rs INBOUND_BUFFER_SIZE);
# a longer one is truncated and then discarded as a whole, so handshake floods that
# should be processed have to stay at or under this size per datagram.
MAX_HANDSHAKE_DATAGRAM = 8192


def dtls_record(body: bytes, seq: int, content_type: int = CONTENT_HANDSHAKE, epoch: int = 0) -> bytes:
    """One DTLS record: the 13-byte header (RFC 6347 §4.1) and `body`."""
    return (struct.pack(">B2sH", content_type, DTLS_1_2, epoch) + seq.to_bytes(6, "big")
            + struct.pack(">H", len(body)) + body)


def handshake_header(msg_type: int, length: int, message_seq: int, offset: int, fragment_length: int) -> bytes:
    """The 12-byte DTLS handshake header (RFC 6347 §4.2.2). `length` is the whole
    message's length; offset and fragment_length place this fragment in it."""
    return (bytes([msg_type]) + length.to_bytes(3, "big") + message_seq.to_bytes(2, "big")
            + offset.to_bytes(3, "big") + fragment_length.to_bytes(3, "big"))


def client_hello_body(cookie: bytes = b"",
                      cipher_suites=(TLS_PSK_WITH_AES_128_CCM_8, TLS_PSK_WITH_AES_128_GCM_SHA256),
                      extensions_block: bytes = b"") -> bytes:
    """A DTLS 1.2 ClientHello body (RFC 6347 §4.2.1, RFC 5246 §7.4.1.2): version, random,
    empty session id, `cookie`, PSK cipher suites, null compression, and the extensions
    block `extensions_block` verbatim behind its 2-byte length (so that a malformed block,
    e.g. 1-3 bytes that cannot hold one extension header, can be sent)."""
    suites = b"".join(struct.pack(">H", s) for s in cipher_suites)
    return (DTLS_1_2 + os.urandom(32) + b"\x00" + bytes([len(cookie)]) + cookie
            + struct.pack(">H", len(suites)) + suites + b"\x01\x00"
            + struct.pack(">H", len(extensions_block)) + extensions_block)


def client_hello_datagram(body: bytes, record_seq: int = 0, message_seq: int = 0) -> bytes:
    """An unfragmented ClientHello in one epoch-0 handshake record."""
    return dtls_record(handshake_header(HS_CLIENT_HELLO, len(body), message_seq, 0, len(body)) + body, record_seq)


def packed_fragments(msg_type: int, message_seq: int, offsets, data: bytes = b"\x00") -> bytes:
    """Back-to-back 1-byte handshake fragments at `offsets`, each claiming a message
    `length` of 1 (13 bytes each). webrtc-dtls's FragmentBuffer::push cuts a record into
    fragments by each header's `length` field (not by fragment_length) and never checks
    offset + fragment_length <= length, so this is how many fragments fit one record;
    with an honest length only one fragment per record would be parsed and the rest of
    the record taken as its data. `data` gives each fragment's byte (by index into it,
    cycling), so the same packing can carry a real message (see fragmented_client_hello)."""
    prefix = bytes([msg_type]) + (1).to_bytes(3, "big") + message_seq.to_bytes(2, "big")
    tail = (1).to_bytes(3, "big")
    n = len(data)
    return b"".join(prefix + off.to_bytes(3, "big") + tail + data[off % n:off % n + 1] for off in offsets)


def fragment_flood(n_fragments: int, message_seq: int, first_record_seq: int,
                   max_datagram: int = MAX_HANDSHAKE_DATAGRAM):
    """Review C1: the datagrams of one ClientHello "message" of `n_fragments` 1-byte
    fragments: offsets 1..n-1 first, packed into records of at most `max_datagram`
    bytes (one record per datagram), then offset 0 alone, claiming the full length n.
    On reassembly webrtc-dtls's `append_message` recurses once per fragment of the chain
    0 -> 1 -> 2 -> ..., i.e. n levels deep. Returns (flood_datagrams, final_datagram)."""
    per_record = (max_datagram - RECORD_HEADER_LEN) // (HANDSHAKE_HEADER_LEN + 1)
    datagrams = []
    seq = first_record_seq
    for start in range(1, n_fragments, per_record):
        stop = min(start + per_record, n_fragments)
        datagrams.append(dtls_record(packed_fragments(HS_CLIENT_HELLO, message_seq, range(start, stop)), seq))
        seq += 1
    final = dtls_record(handshake_header(HS_CLIENT_HELLO, n_fragments, message_seq, 0, 1) + b"\x00", seq)
    return datagrams, final


def fragmented_client_hello(body: bytes, message_seq: int = 0, first_record_seq: int = 0,
                            max_datagram: int = MAX_HANDSHAKE_DATAGRAM):
    """Control for `fragment_flood`: a *real* ClientHello `body` sent as 1-byte fragments
    with the flood's packing (length-1 headers, many per record) and order (offset 0 last).
    The first-sent fragment (offset 1), the last one of the chain (offset L-1) and offset 0
    claim the true length L and travel alone in their records, so that webrtc-dtls
    reassembles exactly `body` and answers with a HelloVerifyRequest. That proves the
    server parses the flood's records and fragments as intended. Returns the datagrams in
    sending order."""
    length = len(body)
    assert length > 3
    seq = first_record_seq
    out = [dtls_record(handshake_header(HS_CLIENT_HELLO, length, message_seq, 1, 1) + body[1:2], seq)]
    per_record = (max_datagram - RECORD_HEADER_LEN) // (HANDSHAKE_HEADER_LEN + 1)
    for start in range(2, length - 1, per_record):
        seq += 1
        stop = min(start + per_record, length - 1)
        out.append(dtls_record(packed_fragments(HS_CLIENT_HELLO, message_seq, range(start, stop), body), seq))
    for off in (length - 1, 0):
        seq += 1
        out.append(dtls_record(handshake_header(HS_CLIENT_HELLO, length, message_seq, off, 1) + body[off:off + 1], seq))
    return out


class DtlsRecord(NamedTuple):
    content_type: int
    epoch: int
    seq: int
    body: bytes

    @property
    def handshake_type(self):
        return self.body[0] if self.content_type == CONTENT_HANDSHAKE and self.epoch == 0 and self.body else None


def parse_dtls_records(datagram: bytes):
    """The records of a datagram (stops at a truncated one)."""
    records, pos = [], 0
    while pos + RECORD_HEADER_LEN <= len(datagram):
        ctype = datagram[pos]
        epoch = int.from_bytes(datagram[pos + 3:pos + 5], "big")
        seq = int.from_bytes(datagram[pos + 5:pos + 11], "big")
        length = int.from_bytes(datagram[pos + 11:pos + 13], "big")
        body = datagram[pos + 13:pos + 13 + length]
        records.append(DtlsRecord(ctype, epoch, seq, body))
        pos += RECORD_HEADER_LEN + length
    return records


# --------------------------------------------------------------------------------------
# CoAP
# --------------------------------------------------------------------------------------

COAP_CON, COAP_NON, COAP_ACK, COAP_RST = 0, 1, 2, 3
COAP_POST = 0x02
COAP_PUT = 0x03
COAP_CONTINUE = (2 << 5) | 31  # 2.31
OPT_URI_PATH = 11
OPT_URI_QUERY = 15
OPT_BLOCK1 = 27


def coap_code_str(code: int) -> str:
    return f"{code >> 5}.{code & 31:02d}"


def _nibble(n: int):
    """(nibble, extension bytes) for an option delta or length (RFC 7252 §3.1)."""
    if n < 13:
        return n, b""
    if n < 269:
        return 13, bytes([n - 13])
    return 14, (n - 269).to_bytes(2, "big")


def coap_options(options) -> bytes:
    """Encodes (number, value) pairs in the order given; numbers must not decrease,
    a repeated number is delta 0 (RFC 7252 §3.1)."""
    out, last = bytearray(), 0
    for number, value in options:
        delta = number - last
        assert delta >= 0, "CoAP options go in ascending order"
        dn, dx = _nibble(delta)
        ln, lx = _nibble(len(value))
        out += bytes([(dn << 4) | ln]) + dx + lx + value
        last = number
    return bytes(out)


def coap_message(message_id: int, token: bytes, options, payload: bytes = b"",
                 code: int = COAP_POST, mtype: int = COAP_CON) -> bytes:
    header = bytes([0x40 | (mtype << 4) | len(token), code]) + message_id.to_bytes(2, "big")
    body = coap_options(options)
    return header + token + body + (b"\xff" + payload if payload else b"")


def block1_value(num: int, more: bool, szx: int) -> bytes:
    """Block1 option value (RFC 7959 §2.2): NUM | M | SZX in the fewest bytes (0 -> empty)."""
    v = (num << 4) | (0b1000 if more else 0) | szx
    return v.to_bytes((v.bit_length() + 7) // 8, "big") if v else b""


def block1_request(message_id: int, token: bytes, path=("t",), code: int = COAP_POST,
                   n_repeats: int = 0, szx: int = 6) -> bytes:
    """A CON request (POST by default) to `path` carrying the first block (num 0, more=1)
    of a Block1 upload: exactly 2**(szx+4) bytes of payload, as a non-final block must be.
    Before the Block1 option come `n_repeats` empty Uri-Query options (number 15, repeated
    with delta 0; Block1 is 27, so the ascending order holds). n_repeats=0 is a
    well-formed first block (answered 2.31 Continue); review H1's bloat uses 60 000 of
    them (1 byte each on the wire)."""
    options = ([(OPT_URI_PATH, seg.encode()) for seg in path] + [(OPT_URI_QUERY, b"")] * n_repeats
               + [(OPT_BLOCK1, block1_value(0, True, szx))])
    return coap_message(message_id, token, options, payload=b"x" * (1 << (szx + 4)), code=code)


def with_id(template: bytes, message_id: int, token: bytes) -> bytes:
    """`template` (a request with a token of the same length) with a new message id and token."""
    return template[:2] + message_id.to_bytes(2, "big") + token + template[4 + len(token):]


class CoapReply(NamedTuple):
    mtype: int
    code: int
    message_id: int
    token: bytes


def parse_coap(datagram: bytes):
    if len(datagram) < 4 or datagram[0] >> 6 != 1:
        return None
    tkl = datagram[0] & 0x0F
    return CoapReply((datagram[0] >> 4) & 3, datagram[1], int.from_bytes(datagram[2:4], "big"), datagram[4:4 + tkl])


# --------------------------------------------------------------------------------------
# AMQP 1.0 type encoding (part 1)
# --------------------------------------------------------------------------------------

def a_null() -> bytes:
    return b"\x40"


def a_bool(v: bool) -> bytes:
    return b"\x41" if v else b"\x42"


def a_ubyte(n: int) -> bytes:
    return b"\x50" + bytes([n])


def a_uint(n: int) -> bytes:
    if n == 0:
        return b"\x43"
    if n < 256:
        return b"\x52" + bytes([n])
    return b"\x70" + struct.pack(">I", n)


def _variable(small: int, large: int, data: bytes) -> bytes:
    if len(data) < 256:
        return bytes([small, len(data)]) + data
    return bytes([large]) + struct.pack(">I", len(data)) + data


def a_str(s: str) -> bytes:
    return _variable(0xA1, 0xB1, s.encode())


def a_sym(s: str) -> bytes:
    return _variable(0xA3, 0xB3, s.encode("ascii"))


def a_bin(b: bytes) -> bytes:
    return _variable(0xA0, 0xB0, b)


def a_list(items) -> bytes:
    """list0 / list8 / list32 of already-encoded items."""
    if not items:
        return b"\x45"
    body = b"".join(items)
    if len(body) + 1 < 256 and len(items) < 256:
        return bytes([0xC0, len(body) + 1, len(items)]) + body
    return b"\xd0" + struct.pack(">II", len(body) + 4, len(items)) + body


def a_described(code: int, value: bytes) -> bytes:
    """A value described by a smallulong descriptor (0x00 0x53 code)."""
    return b"\x00\x53" + bytes([code]) + value


def nested_list(depth: int) -> bytes:
    """Review H5(b): a list nested `depth` levels deep, built without recursion.
    `depth` list32 headers (d0 <size> <count=1>), outermost first, around an empty list0
    (0x45). Level j counted from the inside encodes 9*j + 10 bytes, so its size field
    (everything after the size field) is 4 + 9*j + 1. O(depth) in time and memory."""
    out = bytearray(9 * depth + 1)
    pos = 0
    for j in range(depth - 1, -1, -1):
        out[pos:pos + 9] = b"\xd0" + struct.pack(">II", 9 * j + 5, 1)
        pos += 9
    out[pos] = 0x45
    return bytes(out)


def amqp_value_section(value: bytes) -> bytes:
    """The message body section amqp-value (0x00 0x53 0x77)."""
    return a_described(0x77, value)


# --- decoding (only what a server's frames need; recursion is fine for these) -----------

class Described(NamedTuple):
    descriptor: object
    value: object


_FIXED = {0x50: 1, 0x51: 1, 0x52: 1, 0x53: 1, 0x54: 1, 0x55: 1, 0x56: 1, 0x60: 2, 0x61: 2,
          0x70: 4, 0x71: 4, 0x72: 4, 0x73: 4, 0x74: 4, 0x80: 8, 0x81: 8, 0x82: 8, 0x83: 8,
          0x84: 8, 0x94: 16, 0x98: 16}


def _decode_body(code: int, buf: bytes, pos: int):
    if code == 0x40:
        return None, pos
    if code in (0x41, 0x42):
        return code == 0x41, pos
    if code in (0x43, 0x44):
        return 0, pos
    if code == 0x45:
        return [], pos
    if code in _FIXED:
        n = _FIXED[code]
        raw = buf[pos:pos + n]
        if code == 0x56:
            return raw != b"\x00", pos + n
        if code in (0x50, 0x52, 0x53, 0x60, 0x70, 0x80, 0x83):
            return int.from_bytes(raw, "big"), pos + n
        if code in (0x51, 0x54, 0x55, 0x61, 0x71, 0x81):
            return int.from_bytes(raw, "big", signed=True), pos + n
        return raw, pos + n
    if code in (0xA0, 0xA1, 0xA3, 0xB0, 0xB1, 0xB3):
        width = 1 if code < 0xB0 else 4
        n = int.from_bytes(buf[pos:pos + width], "big")
        raw = buf[pos + width:pos + width + n]
        return (raw if code in (0xA0, 0xB0) else raw.decode(errors="replace")), pos + width + n
    if code in (0xC0, 0xC1, 0xD0, 0xD1):
        width = 1 if code < 0xD0 else 4
        size = int.from_bytes(buf[pos:pos + width], "big")
        count = int.from_bytes(buf[pos + width:pos + 2 * width], "big")
        end = pos + width + size
        p = pos + 2 * width
        items = []
        for _ in range(count):
            item, p = decode(buf, p)
            items.append(item)
        if code in (0xC1, 0xD1):
            return dict(zip(items[::2], items[1::2])), end
        return items, end
    if code in (0xE0, 0xF0):
        width = 1 if code == 0xE0 else 4
        size = int.from_bytes(buf[pos:pos + width], "big")
        count = int.from_bytes(buf[pos + width:pos + 2 * width], "big")
        end = pos + width + size
        p = pos + 2 * width
        elem = buf[p]
        p += 1
        items = []
        for _ in range(count):
            item, p = _decode_body(elem, buf, p)
            items.append(item)
        return items, end
    raise ValueError(f"AMQP type code 0x{code:02x} not supported by this test decoder")


def decode(buf: bytes, pos: int = 0):
    """One AMQP value at `pos`: (value, next position). Described values become `Described`."""
    code = buf[pos]
    if code == 0x00:
        descriptor, p = decode(buf, pos + 1)
        value, p = decode(buf, p)
        return Described(descriptor, value), p
    return _decode_body(code, buf, pos + 1)


PERFORMATIVES = {0x10: "open", 0x11: "begin", 0x12: "attach", 0x13: "flow", 0x14: "transfer",
                 0x15: "disposition", 0x16: "detach", 0x17: "end", 0x18: "close",
                 0x40: "sasl-mechanisms", 0x41: "sasl-init", 0x42: "sasl-challenge",
                 0x43: "sasl-response", 0x44: "sasl-outcome"}
OUTCOMES = {0x23: "received", 0x24: "accepted", 0x25: "rejected", 0x26: "released", 0x27: "modified"}


class Frame(NamedTuple):
    channel: int
    name: str
    fields: list

    def field(self, i, default=None):
        return self.fields[i] if i < len(self.fields) and self.fields[i] is not None else default

    def error(self):
        """The `error` field of detach (2), end (0) and close (0), as 'condition: description'."""
        index = {"detach": 2, "end": 0, "close": 0}.get(self.name)
        err = self.field(index) if index is not None else None
        if isinstance(err, Described) and isinstance(err.value, list):
            return ": ".join(str(x) for x in err.value[:2] if x is not None)
        return None

    def outcome(self):
        """For a disposition: the state's name (accepted, rejected, ...)."""
        state = self.field(4)
        if isinstance(state, Described):
            return OUTCOMES.get(state.descriptor, str(state.descriptor))
        return None


# --------------------------------------------------------------------------------------
# A raw AMQP 1.0 client over one TCP socket
# --------------------------------------------------------------------------------------

SASL_HEADER = b"AMQP\x03\x01\x00\x00"
AMQP_HEADER = b"AMQP\x00\x01\x00\x00"


def amqp_frame(body: bytes, channel: int = 0, frame_type: int = 0) -> bytes:
    """Frame header (size, doff=2, type 0 AMQP / 1 SASL, channel) and body."""
    return struct.pack(">IBBH", 8 + len(body), 2, frame_type, channel) + body


def sasl_init_plain(user: str, password: str) -> bytes:
    return amqp_frame(a_described(0x41, a_list([a_sym("PLAIN"), a_bin(b"\0" + user.encode() + b"\0" + password.encode())])),
                      frame_type=1)


def open_frame(container_id: str, max_frame_size: int) -> bytes:
    return amqp_frame(a_described(0x10, a_list([a_str(container_id), a_null(), a_uint(max_frame_size)])))


def begin_frame(window: int = 2048) -> bytes:
    # remote-channel null, next-outgoing-id, incoming-window, outgoing-window
    return amqp_frame(a_described(0x11, a_list([a_null(), a_uint(0), a_uint(window), a_uint(window)])))


def attach_sender_frame(name: str, handle: int, address: str) -> bytes:
    source = a_described(0x28, a_list([]))
    target = a_described(0x29, a_list([a_str(address)]))
    # name, handle, role=sender(false), snd/rcv-settle-mode default, source, target,
    # unsettled, incomplete-unsettled, initial-delivery-count
    fields = [a_str(name), a_uint(handle), a_bool(False), a_null(), a_null(), source, target,
              a_null(), a_bool(False), a_uint(0)]
    return amqp_frame(a_described(0x12, a_list(fields)))


def transfer_performative(handle: int, delivery_id: int, tag: bytes, more: bool) -> bytes:
    # handle, delivery-id, delivery-tag, message-format 0, settled false, more
    return a_described(0x14, a_list([a_uint(handle), a_uint(delivery_id), a_bin(tag), a_uint(0),
                                     a_bool(False), a_bool(more)]))


def transfer_frames(payload: bytes, handle: int, delivery_id: int, tag: bytes, max_frame_size: int,
                    max_chunk: int = None):
    """The transfer frames of one delivery: `payload` split so every frame fits
    `max_frame_size` (or into chunks of `max_chunk`), more=true on all but the last. Every
    frame repeats delivery-id and tag (allowed when they match, AMQP 1.0 §2.7.5)."""
    overhead = 8 + len(transfer_performative(handle, delivery_id, tag, True))
    chunk = max_frame_size - overhead
    if max_chunk:
        chunk = min(chunk, max_chunk)
    pieces = [payload[i:i + chunk] for i in range(0, len(payload), chunk)] or [b""]
    return [amqp_frame(transfer_performative(handle, delivery_id, tag, i < len(pieces) - 1) + piece)
            for i, piece in enumerate(pieces)]


class AmqpClosed(Exception):
    """The server ended the conversation (EOF, reset, or close/end/detach)."""


class RawAmqp:
    """A hand-driven AMQP 1.0 client: one connection, one session (channel 0), links by
    handle. Every performative is encoded here, byte by byte."""

    def __init__(self, address: str, timeout: float = 10.0):
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.buf = b""
        self.max_frame_size = 512  # until the open exchange
        self.frames = []  # everything the server sent, in order

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _fill(self, n: int, deadline: float):
        while len(self.buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no data from the server (had {len(self.buf)} of {n} bytes)")
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                raise AmqpClosed("eof")
            self.buf += data

    def _take(self, n: int, deadline: float) -> bytes:
        self._fill(n, deadline)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_frame(self, timeout: float = 10.0) -> Frame:
        """The next non-empty frame (heartbeats skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            size, doff, _ftype, channel = struct.unpack(">IBBH", self._take(8, deadline))
            rest = self._take(size - 8, deadline)
            body = rest[doff * 4 - 8:]
            if not body:
                continue
            perf, _ = decode(body)
            if not isinstance(perf, Described):
                raise ValueError(f"frame body is not a performative: {body[:32].hex()}")
            frame = Frame(channel, PERFORMATIVES.get(perf.descriptor, str(perf.descriptor)), perf.value or [])
            self.frames.append(frame)
            return frame

    def expect(self, name: str, timeout: float = 10.0) -> Frame:
        """Reads until a `name` frame; a close/end/detach (or sasl failure) on the way is an error."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.read_frame(max(0.0, deadline - time.monotonic()))
            if frame.name == name:
                return frame
            if frame.name in ("close", "end", "detach"):
                raise AmqpClosed(f"{frame.name} while waiting for {name}: {frame.error()}")

    def sasl_plain(self, user: str, password: str):
        self.sock.sendall(SASL_HEADER)
        header = self._take(8, time.monotonic() + 10)
        assert header == SASL_HEADER, f"server answered the SASL header with {header!r}"
        self.expect("sasl-mechanisms")
        self.sock.sendall(sasl_init_plain(user, password))
        outcome = self.expect("sasl-outcome")
        assert outcome.field(0) == 0, f"SASL PLAIN refused: code {outcome.field(0)}"

    def open(self, max_frame_size: int = 65536, container_id: str = "hostile-test") -> int:
        self.sock.sendall(AMQP_HEADER)
        header = self._take(8, time.monotonic() + 10)
        assert header == AMQP_HEADER, f"server answered the AMQP header with {header!r}"
        self.sock.sendall(open_frame(container_id, max_frame_size))
        remote = self.expect("open")
        self.max_frame_size = min(max_frame_size, remote.field(2, 0xFFFFFFFF))
        return self.max_frame_size

    def begin(self):
        self.sock.sendall(begin_frame())
        self.expect("begin")

    def attach_sender(self, address: str, handle: int = 0, name: str = "hostile-sender") -> int:
        """Attaches a sending link and waits for the server's flow; returns the link credit."""
        self.sock.sendall(attach_sender_frame(name, handle, address))
        attach = self.expect("attach")
        assert attach.field(6) is not None, f"attach refused (no target): {attach.fields}"
        while True:
            flow = self.expect("flow")
            if flow.field(4) == handle and (flow.field(6) or 0) > 0:
                return flow.field(6)

    def send_delivery(self, payload: bytes, delivery_id: int, handle: int = 0, max_chunk: int = None) -> int:
        """Sends one delivery; returns the number of transfer frames used."""
        frames = transfer_frames(payload, handle, delivery_id, f"d{delivery_id}".encode(), self.max_frame_size, max_chunk)
        for f in frames:
            self.sock.sendall(f)
        return len(frames)

    def outcome(self, timeout: float = 10.0) -> str:
        """Waits for what the server does next with our delivery, and describes it:
        'disposition:<outcome>', '<detach|end|close>:<error>', 'eof', 'reset' or 'timeout'."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                frame = self.read_frame(max(0.0, deadline - time.monotonic()))
                if frame.name == "disposition":
                    return f"disposition:{frame.outcome()}"
                if frame.name in ("detach", "end", "close"):
                    return f"{frame.name}:{frame.error()}"
        except AmqpClosed:
            return "eof"
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        except (TimeoutError, socket.timeout):
            return "timeout"
