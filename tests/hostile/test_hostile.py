"""Hostile input against a real `ferrule serve`: each test sends one attack from the
security review (shared/reviews/security-2026-12.md beside the repository) with raw sockets, over
loopback only, bounded in size and time, and then requires that

* the process is still running,
* a registered device's HTTP telemetry still reaches a python-qpid-proton receiver on
  telemetry/t1 within a few seconds (hostile_support.Target.assert_healthy), and
* the server's RSS (VmRSS) grew by less than RSS_GROWTH_BOUND_MB over its warmed-up
  baseline.

Every test starts its own server (the `target` fixture), so a crash stays in its test.
Each attack first checks, where a fixed server must still agree, that its bytes are
well-formed (a plain ClientHello gets a HelloVerifyRequest, a small Block1 first block
gets 2.31 Continue, a 10-deep AMQP body is accepted and delivered), so that a pass is not
the server ignoring malformed input.

Run: FERRULE_BIN=target/debug/ferrule python3 -m pytest -q tests/hostile  (about 15 s)
"""
import collections
import os
import selectors
import shutil
import socket
import subprocess
import time
import uuid

from hostile_support import PSK, TENANT, USERS, Collector, expect_body
from hostile_wire import (
    COAP_CONTINUE, COAP_PUT, HANDSHAKE_HEADER_LEN, HS_HELLO_VERIFY_REQUEST, HS_SERVER_HELLO, RawAmqp,
    amqp_value_section, block1_request, client_hello_body, client_hello_datagram, coap_code_str,
    fragment_flood, fragmented_client_hello, nested_list, parse_coap, parse_dtls_records, with_id,
)

# Bound on RSS growth (VmRSS after the attack and the health check, minus the baseline).
# Today's growth without an attack-specific leak: about 20 MB (C1 flood before the
# crash), about 40 MB (2 000 pending DTLS handshakes); H1 alone adds about 850 MB.
RSS_GROWTH_BOUND_MB = 100

# C1: about 2.6 MB of 13-byte fragments (12-byte header + 1 byte) from one source.
DTLS_FLOOD_BYTES = 2_600_000
DTLS_FLOOD_FRAGMENTS = DTLS_FLOOD_BYTES // (HANDSHAKE_HEADER_LEN + 1)
# Datagrams per burst and the pause between bursts: the server queues 32 datagrams per
# DTLS peer and drops the rest, so the flood is paced (about 0.4 s for all of it).
DTLS_FLOOD_BURST, DTLS_FLOOD_PAUSE = 8, 0.010

# H2: ClientHellos from distinct source ports, sent over about two seconds.
CLIENT_HELLO_FLOOD = 2_000
CLIENT_HELLO_FLOOD_SECONDS = 2.0

# H1: datagrams (one per source port) and the empty options in each (~61 KB datagrams).
BLOCK1_DATAGRAMS = 300
BLOCK1_EMPTY_OPTIONS = 60_000

# H5(b): nesting depth of the amqp-value list.
NESTING_DEPTH = 50_000


def udp_socket(timeout=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(timeout)
    return s


def wait_for_exit(target, seconds):
    """Gives the server `seconds` to act on what it was sent (returns early if it died)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and target.platform.proc.poll() is None:
        time.sleep(0.05)


def dtls_answer(sock, timeout=5.0):
    """The handshake types in the server's next datagram (None: no answer)."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(65536)
    except (socket.timeout, TimeoutError):
        return None
    return [r.handshake_type for r in parse_dtls_records(data)]


# --------------------------------------------------------------------------------------
# 1. Review C1: DTLS fragment reassembly recursion (unauthenticated, one source)
# --------------------------------------------------------------------------------------

def test_dtls_fragment_flood_c1(target):
    """C1: one UDP source sends a ClientHello to the DTLS port (opening a session), then
    about 2.6 MB of 1-byte handshake fragments of ONE further message (msg_type 1,
    message_seq 1): offsets 1..N-1 first, many fragments per record and one record per
    datagram (<= 8 KiB, the size webrtc-dtls reads), and the fragment at offset 0 last.
    webrtc-dtls's FragmentBuffer reassembles that chain recursively, N = 200 000 levels
    deep, which overflows the worker's stack and aborts the process."""
    addr = target.addr("coaps")
    notes = []

    # Diagnostic only (a fixed server may rightly refuse it): a real ClientHello in the
    # flood's packing (length-1 fragment headers, offset 0 last) is reassembled today and
    # answered with a HelloVerifyRequest, so the server parses the flood as fragments.
    control = udp_socket()
    for datagram in fragmented_client_hello(client_hello_body()):
        control.sendto(datagram, addr)
        time.sleep(0.002)
    notes.append(f"fragment-packing control (real ClientHello, 1-byte fragments) answered {dtls_answer(control, 2.0)}")
    control.close()

    attacker = udp_socket()
    # Control that must hold on any server: a plain ClientHello gets an answer.
    attacker.sendto(client_hello_datagram(client_hello_body(), record_seq=0, message_seq=0), addr)
    answer = dtls_answer(attacker)
    assert answer and answer[0] in (HS_HELLO_VERIFY_REQUEST, HS_SERVER_HELLO), \
        f"a plain ClientHello got {answer!r}, not a HelloVerifyRequest/ServerHello"
    notes.append(f"plain ClientHello answered with handshake type {answer}")

    flood, final = fragment_flood(DTLS_FLOOD_FRAGMENTS, message_seq=1, first_record_seq=1)
    sent = 0
    started = time.monotonic()
    for i, datagram in enumerate(flood):
        attacker.sendto(datagram, addr)
        sent += len(datagram)
        if i % DTLS_FLOOD_BURST == DTLS_FLOOD_BURST - 1:
            time.sleep(DTLS_FLOOD_PAUSE)
    time.sleep(0.3)  # let the session's queue drain before the fragment that closes the chain
    attacker.sendto(final, addr)
    sent += len(final)
    notes.append(f"flood: {len(flood) + 1} datagrams, {sent} bytes, {DTLS_FLOOD_FRAGMENTS} fragments "
                 f"in {time.monotonic() - started:.1f} s")
    wait_for_exit(target, 2.0)
    attacker.close()
    print("\n".join(notes))
    target.assert_healthy("the DTLS fragment flood (C1; " + "; ".join(notes) + ")", RSS_GROWTH_BOUND_MB)


# --------------------------------------------------------------------------------------
# 2. Review H2: ClientHello flood and malformed extension blocks
# --------------------------------------------------------------------------------------

def test_dtls_client_hello_flood_h2(target):
    """H2: 2 000 ClientHellos from 2 000 source ports within about two seconds (each one
    takes a DTLS session slot and an ECDH key generation on today's server), then three
    ClientHellos whose extensions block is 1, 2 and 3 bytes long (webrtc-dtls indexes past
    the end of such a block and panics). Afterwards a real device must still complete a
    PSK handshake with libcoap's coap-client-openssl and its telemetry must arrive."""
    client = shutil.which("coap-client-openssl")
    assert client, "coap-client-openssl not found (Debian/Ubuntu package libcoap3-bin)"
    addr = target.addr("coaps")
    host, port = addr
    # Created before the flood: proton's select() cannot watch descriptors above 1023,
    # and the flood's 2 000 sockets take those.
    collector = Collector(target.platform.url(TENANT), f"telemetry/{TENANT}")
    collector.start()
    socks = []
    try:
        sel = selectors.DefaultSelector()
        started = time.monotonic()
        batch = 50
        for i in range(CLIENT_HELLO_FLOOD):
            s = udp_socket()
            s.setblocking(False)
            socks.append(s)
            sel.register(s, selectors.EVENT_READ)
            s.sendto(client_hello_datagram(client_hello_body()), addr)
            if i % batch == batch - 1:
                time.sleep(CLIENT_HELLO_FLOOD_SECONDS * batch / CLIENT_HELLO_FLOOD)
        flood_seconds = time.monotonic() - started
        # How many hellos the server answered (informational: a fixed server may answer
        # all of them statelessly, or rate-limit).
        answered, quiet_since = 0, time.monotonic()
        while time.monotonic() - quiet_since < 0.5 and time.monotonic() - started < 8:
            for key, _ in sel.select(0.1):
                try:
                    key.fileobj.recv(65536)
                    answered += 1
                    quiet_since = time.monotonic()
                except OSError:
                    pass
        sel.close()

        malformed = {}
        for block in (b"\x00", b"\x00\x0a", b"\x00\x0a\x00"):
            s = udp_socket()
            socks.append(s)
            s.sendto(client_hello_datagram(client_hello_body(extensions_block=block)), addr)
            malformed[block.hex()] = dtls_answer(s, 0.5)
        target.assert_alive("the ClientHello flood and the malformed ClientHellos (H2)")

        body = f"dtls-after-flood-{uuid.uuid4().hex}"
        device = subprocess.run(
            [client, "-m", "post", "-u", f"d1@{TENANT}", "-k", PSK, "-t", "text/plain", "-e", body, "-B", "10",
             f"coaps://{host}:{port}/telemetry"],
            capture_output=True, text=True, timeout=30)
        notes = (f"{CLIENT_HELLO_FLOOD} ClientHellos sent in {flood_seconds:.1f} s, {answered} answered; "
                 f"malformed extension blocks answered {malformed}; "
                 f"panics in the log: {target.platform.log_text().count('panicked at')}")
        print(notes)
        assert device.returncode == 0, (
            f"coap-client-openssl (PSK) failed after the flood: rc {device.returncode}, "
            f"stderr {device.stderr[-500:]!r} ({notes})")
        expect_body(collector, body.encode(), 5.0)
    finally:
        collector.close()
        for s in socks:
            s.close()
    target.assert_healthy("the ClientHello flood (H2)", RSS_GROWTH_BOUND_MB)


# --------------------------------------------------------------------------------------
# 3. Review H1: CoAP Block1 reassembly keeps every option of the first block
# --------------------------------------------------------------------------------------

def send_paced(socks, datagrams, addr, window=2, reply_timeout=1.0, deadline=60.0):
    """Sends datagrams[i] from socks[i], keeping at most `window` unanswered at a time (the
    server's receive buffer holds only three such datagrams). A server that stops
    answering is then paced by a short timeout instead. Returns a Counter of reply codes
    ('none' for datagrams given up on)."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    codes = collections.Counter()
    outstanding, i, timeout = 0, 0, reply_timeout
    end = time.monotonic() + deadline
    while (i < len(datagrams) or outstanding) and time.monotonic() < end:
        while i < len(datagrams) and outstanding < window:
            socks[i].sendto(datagrams[i], addr)
            i += 1
            outstanding += 1
        events = sel.select(timeout)
        if not events:
            codes["none"] += outstanding
            outstanding, timeout = 0, 0.05
            continue
        for key, _ in events:
            reply = parse_coap(key.fileobj.recv(65536))
            codes[coap_code_str(reply.code) if reply else "garbage"] += 1
            outstanding = max(0, outstanding - 1)
            timeout = reply_timeout
    sel.close()
    codes["unsent"] = len(datagrams) - i
    return codes


def test_coap_block1_option_bloat_h1(target):
    """H1: 300 CON POSTs to the plain CoAP port, each from its own source port and about
    61 KB: Uri-Path 't', then 60 000 empty Uri-Query options (option 15 repeated with
    delta 0), then Block1 (num 0, more=1, szx 6) and a 1 KiB first block. Today each
    first block is stored with all of its options for the exchange lifetime (247 s),
    about 2.9 MB per datagram, before any authentication or option check."""
    addr = target.addr("coap")
    # Control that must hold on any server: a legitimate device's first block (PUT
    # /telemetry/t1/d1, unauthenticated devices are allowed here) gets 2.31 Continue.
    control = udp_socket(5.0)
    control.sendto(block1_request(0x1234, b"ctl1", path=("telemetry", TENANT, "d1"), code=COAP_PUT), addr)
    reply = parse_coap(control.recv(65536))
    control.close()
    assert reply and reply.code == COAP_CONTINUE, \
        f"a well-formed Block1 first block got {coap_code_str(reply.code) if reply else None}, not 2.31"

    template = block1_request(0, b"\0\0\0\0", path=("t",), n_repeats=BLOCK1_EMPTY_OPTIONS)
    datagrams = [with_id(template, i, os.urandom(4)) for i in range(BLOCK1_DATAGRAMS)]
    socks = [udp_socket() for _ in datagrams]
    started = time.monotonic()
    try:
        codes = send_paced(socks, datagrams, addr)
    finally:
        for s in socks:
            s.close()
    notes = (f"{BLOCK1_DATAGRAMS} datagrams of {len(template)} bytes with {BLOCK1_EMPTY_OPTIONS} empty options "
             f"in {time.monotonic() - started:.1f} s, replies {dict(codes)}")
    print(notes)
    target.assert_healthy(f"the CoAP Block1 option bloat (H1; {notes})", RSS_GROWTH_BOUND_MB)


# --------------------------------------------------------------------------------------
# 4. Review H5(b): an AMQP message body nested 50 000 lists deep
# --------------------------------------------------------------------------------------

def test_amqp_deeply_nested_body_h5b(target):
    """H5(b): an application of tenant t1 (SASL PLAIN), on a hand-encoded connection,
    attaches a sender to telemetry/t1 and sends one message whose amqp-value body is a
    list nested 50 000 deep (450 KB, split over several transfer frames). Today the
    server decodes it recursively and overflows a worker's stack, aborting the process.
    The attacking connection must end up closed or refused (not left hanging)."""
    user, password = USERS[TENANT]
    collector = Collector(target.platform.url(TENANT), f"telemetry/{TENANT}")
    collector.start()
    amqp = RawAmqp(target.platform.address)
    payload, frames, max_frame, seen = b"", 0, None, "nothing (the attack was not sent)"
    try:
        amqp.sasl_plain(user, password)
        max_frame = amqp.open()
        amqp.begin()
        credit = amqp.attach_sender(f"telemetry/{TENANT}")
        assert credit >= 2, f"only {credit} credit"

        # Control that must hold on any server: the same framing with a 10-deep list,
        # split over three transfer frames, is accepted and delivered.
        frames = amqp.send_delivery(amqp_value_section(nested_list(10)), delivery_id=0, max_chunk=40)
        assert frames == 3
        outcome = amqp.outcome(10)
        assert outcome == "disposition:accepted", f"the 10-deep control message got {outcome}"
        body, depth = collector.next(timeout=5).body, 0
        while isinstance(body, list) and body:
            body, depth = body[0], depth + 1
        assert depth == 10 and body == [], f"the control arrived as {collector.messages[-1].body!r}"

        payload = amqp_value_section(nested_list(NESTING_DEPTH))
        frames = amqp.send_delivery(payload, delivery_id=1)
        seen = amqp.outcome(10)
    except (ConnectionResetError, BrokenPipeError) as e:
        seen = f"reset while sending ({e})"
    finally:
        amqp.close()
        collector.close()
    notes = (f"{len(payload)}-byte message in {frames} transfer frames (max frame {max_frame}); "
             f"the attacking connection saw: {seen}")
    print(notes)
    wait_for_exit(target, 0.5)
    target.assert_alive(f"the deeply nested AMQP body (H5b; {notes})")
    assert seen == "eof" or seen.startswith(("reset", "detach:", "end:", "close:", "disposition:rejected")), (
        f"the attacking connection was neither closed nor refused: {seen}")
    target.assert_healthy(f"the deeply nested AMQP body (H5b; {notes})", RSS_GROWTH_BOUND_MB)
