"""Storage faults (issue 17): below the free-disk floor (`[messaging] min_free_disk`) new
events are refused with backpressure (curl: 503 + Retry-After; paho MQTT 5: PUBACK 0x97;
a python-qpid-proton sender: rejected, amqp:resource-limit-exceeded), nothing acknowledged
is lost, and storing resumes without a restart once space is freed. The disk is filled
for real: a file of the size needed is allocated on the data directory's file system.
Then the disk really full: a 32 MiB tmpfs, no floor, ENOSPC from the store itself."""
import os
import subprocess
import threading
import time

import paho.mqtt.client as paho
import pytest
from proton import Message
from proton.utils import SendException

from amqp_client import Collector, connect
from conftest import Platform
from registry_client import Registry
from test_adapters import mqtt_port, run
from test_ops import get, metric

MIB = 1024 * 1024


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def curl_event(p, body):
    res = run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %header{retry-after}", "-u", "d1@t1:pw",
               "-H", "content-type: text/plain", "--data-binary", body, f"http://{p.listeners['http']}/event"])
    return res.stdout.split()


def mqtt5_event(p, body):
    acked = threading.Event()
    codes = []
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="disk-dev", protocol=paho.MQTTv5)
    client.username_pw_set("d1@t1", "pw")
    client.on_publish = lambda c, u, mid, rc, props: (codes.append(rc.value), acked.set())
    client.connect("127.0.0.1", int(mqtt_port(p)))
    client.loop_start()
    client.publish("event", body, qos=1)
    assert acked.wait(10), "PUBACK"
    client.disconnect()
    client.loop_stop()
    return codes[0]


def test_events_are_refused_below_the_disk_floor_and_resume_when_space_is_freed(platform_factory, tmp_path,
                                                                             monkeypatch):
    free = free_bytes(tmp_path)
    if free < 1024 * MIB:
        pytest.skip(f"needs 1 GiB free on {tmp_path}, has {free // MIB} MiB")
    # The floor sits 256 MiB below what is free now; a 512 MiB file crosses it.
    monkeypatch.setenv("FERRULE__MESSAGING__MIN_FREE_DISK", str(free - 256 * MIB))
    p = platform_factory().start()
    reg = Registry(p.registry_url, p.registry_token)
    reg.tenant("t1").device("t1", "d1", password="pw")

    assert curl_event(p, "before") == ["202"]
    filler = p.data_dir / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 512 * MIB)
    try:
        assert free_bytes(tmp_path) < free - 256 * MIB, "the filler took the space"
        code = curl_event(p, "refused")
        assert code == ["503", "1"], code
        assert mqtt5_event(p, b"refused") == 0x97
        conn = connect(p.url("t1"))
        with pytest.raises(SendException) as err:
            conn.create_sender("event/t1", name="app-events").send(Message(body="refused", durable=True))
        assert err.value.state == 0x25  # rejected
        conn.close()
        _, health = get(p, "/health/live")
        assert health == "live\n", "low disk is backpressure, not a failure"
    finally:
        filler.unlink()

    # Space is back: stored again, no restart.
    assert curl_event(p, "after") == ["202"]
    events = Collector(p.url("t1"), "event/t1", name="events")
    events.start()
    time.sleep(1.5)
    events.close()
    # The MQTT client's connection events are events too (refused or stored by timing).
    bodies = [m.body for m in events.messages if m.content_type != "application/vnd.eclipse-hono-dc-notification+json"]
    assert bodies == [b"before", b"after"], "what was acknowledged, and nothing that was refused"
    _, text = get(p, "/metrics")
    refused = metric(text, "ferrule_queue_refused_storage_total", address="event/t1")
    assert refused is not None and refused >= 3, refused


@pytest.fixture
def small_fs(tmp_path):
    """A 32 MiB tmpfs (root, or a kernel that lets this user mount, is needed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_file_system_is_backpressure_and_recovers_without_restart(small_fs, tmp_path, monkeypatch):
    """The disk really full (ENOSPC on a small tmpfs, no free-space floor): events are
    refused with 503 while storing fails, every acknowledged one is delivered, and storing
    resumes by itself once space is freed."""
    monkeypatch.setenv("FERRULE__MESSAGING__MIN_FREE_DISK", "0")
    p = Platform(small_fs / "data")
    p.log_path = tmp_path / "ferrule.log"  # the log must not need the full disk
    p.start()
    try:
        reg = Registry(p.registry_url, p.registry_token)
        reg.tenant("t1").device("t1", "d1", password="pw")
        assert curl_event(p, "e-0") == ["202"]
        # Take all the space there is but 256 KiB.
        filler = small_fs / "filler"
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, free_bytes(small_fs) - 256 * 1024)
        accepted, refused = ["e-0"], 0
        pad = "x" * 2000
        for i in range(1, 1000):
            body = f"e-{i}-{pad}"
            code = curl_event(p, body)
            if code[0] == "202":
                accepted.append(body)
            else:
                assert code == ["503", "1"], code
                refused += 1
                if refused >= 3:
                    break
        assert refused >= 3, f"the full disk never refused ({len(accepted)} accepted)"
        print(f"{len(accepted)} events stored before the disk was full")
        _, text = get(p, "/metrics")
        assert metric(text, "ferrule_queue_refused_storage_total", address="event/t1") >= 3
        filler.unlink()

        # Space is back: storing resumes without a restart (the store reopens itself).
        deadline = time.time() + 10
        while (code := curl_event(p, "after"))[0] != "202" and time.time() < deadline:
            time.sleep(0.2)
        assert code == ["202"], code
        accepted.append("after")
        _, health = get(p, "/health/live")
        assert health == "live\n"
        events = Collector(p.url("t1"), "event/t1", credit=50, name="events")
        events.start()
        deadline = time.time() + 15
        while len(events.messages) < len(accepted) and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        events.close()
        bodies = [bytes(m.body).decode() for m in events.messages]
        assert bodies == accepted, f"{len(bodies)} delivered of {len(accepted)} acknowledged"
    finally:
        p.stop()
