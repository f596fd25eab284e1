"""Scale-out (issue 14): three stateless Ferrule instances over RabbitMQ (AMQP 1.0) and a
3-master Redis Cluster, driven by stock clients only: mosquitto_pub, curl and libcoap's
coap-client as devices, python-qpid-proton as the application."""
import subprocess
import time

import pytest
from proton import Timeout

from amqp_client import Collector, connect
import os
from pathlib import Path

from conftest import RABBIT_AMQPS, RABBIT_BACKEND, RABBIT_HTTP, TOKEN, brokers_command, unique_tenant
from registry_client import Registry

PSK = "coap-secret-key"


def curl(instance, path, body, user, headers=()):
    cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", f"http://{instance.http}{path}",
           "-u", user, "-H", "content-type: text/plain", "--data-binary", body]
    for h in headers:
        cmd += ["-H", h]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout


def mosquitto_pub(instance, tenant, device, password, topic, body, qos=1, version="mqttv311"):
    return subprocess.run(
        ["mosquitto_pub", "-V", version, "-h", "127.0.0.1", "-p", instance.mqtt_port, "-u", f"{device}@{tenant}",
         "-P", password, "-i", f"{device}-{time.time_ns()}", "-q", str(qos), "-t", topic, "-m", body],
        capture_output=True, text=True, timeout=20)


def coap_post(instance, tenant, device, path, body):
    return subprocess.run(
        ["coap-client-openssl", "-m", "post", "-u", f"{device}@{tenant}", "-k", PSK, "-t", "text/plain",
         "-e", body, f"coaps://{instance.coaps}{path}"],
        capture_output=True, text=True, timeout=20)


def provision(instance, tenant, devices=("d1",)):
    reg = Registry(instance.registry_url, TOKEN)
    reg.tenant(tenant)
    for d in devices:
        reg.device(tenant, d, password="pw1", psk=PSK)
    return reg


def eventually(check, timeout, step=0.05):
    """Polls `check` until it returns a truthy value; returns it and the time it took."""
    start = time.time()
    while True:
        value = check()
        if value:
            return value, time.time() - start
        if time.time() - start > timeout:
            return None, time.time() - start
        time.sleep(step)


def readiness(instance):
    """`/health/ready` of `instance`: (status, body)."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://{instance.listeners['ops']}/health/ready", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def collect(instance, tenant, address, credit=50):
    c = Collector(instance.amqp_url(tenant), address, credit=credit)
    c.start()
    return c


def wait_for_lease(instance, tenant, device="d1"):
    """A new application's consumer lease reaches the other instances within a second;
    until then their telemetry gets 503. Waits until instance's devices get through."""
    ok, _ = eventually(lambda: curl(instance, "/telemetry", "probe", f"{device}@{tenant}:pw1") == "202", 5, 0.2)
    assert ok, "telemetry never found the application's consumer"


NOTIFICATION = "application/vnd.eclipse-hono-dc-notification+json"


def device_messages(collector, n, timeout=15):
    """The next n messages that are not Hono's connection notifications (MQTT devices
    cause `connected`/`disconnected` events)."""
    got = []
    while len(got) < n:
        m = collector.next(timeout=timeout)
        if m.content_type != NOTIFICATION:
            got.append(m)
    return got


def bodies(collector, n, timeout=15):
    return [bytes(m.body) for m in device_messages(collector, n, timeout)]


def test_devices_on_every_instance_reach_an_application_on_instance_2(cluster):
    i1, i2, i3 = cluster(3)
    tenant = unique_tenant()
    provision(i1, tenant)
    telemetry = collect(i2, tenant, f"telemetry/{tenant}")
    events = collect(i2, tenant, f"event/{tenant}")
    try:
        for i in (i1, i3):
            wait_for_lease(i, tenant)
        # drain the probes
        while True:
            try:
                telemetry.next(timeout=1)
            except TimeoutError:
                break
        assert mosquitto_pub(i1, tenant, "d1", "pw1", "telemetry", "mqtt-t@1").returncode == 0
        assert mosquitto_pub(i1, tenant, "d1", "pw1", "event", "mqtt-e@1").returncode == 0
        assert curl(i2, "/telemetry", "http-t@2", f"d1@{tenant}:pw1") == "202"
        assert curl(i2, "/event", "http-e@2", f"d1@{tenant}:pw1") == "202"
        res = coap_post(i3, tenant, "d1", "/telemetry", "coap-t@3")
        assert res.returncode == 0, res.stderr
        res = coap_post(i3, tenant, "d1", "/event", "coap-e@3")
        assert res.returncode == 0, res.stderr
        got_t = device_messages(telemetry, 3)
        got_e = device_messages(events, 3)
        assert sorted(bytes(m.body) for m in got_t) == [b"coap-t@3", b"http-t@2", b"mqtt-t@1"]
        assert sorted(bytes(m.body) for m in got_e) == [b"coap-e@3", b"http-e@2", b"mqtt-e@1"]
        # Hono's format survives the broker: properties, annotations, content type.
        for m in got_t + got_e:
            assert m.properties["device_id"] == "d1"
            assert m.properties["orig_adapter"] in ("hono-mqtt", "hono-http", "hono-coap")
            assert m.annotations["tenant_id"] == tenant
            assert m.annotations["device_id"] == "d1"
        assert {m.properties["orig_adapter"] for m in got_e} == {"hono-mqtt", "hono-http", "hono-coap"}
        assert all(m.durable for m in got_e)
    finally:
        telemetry.close()
        events.close()


def test_events_wait_for_an_application_on_another_instance_and_ttl_expires(cluster):
    i1, _, i3 = cluster(3)
    tenant = unique_tenant()
    provision(i1, tenant)
    # No application anywhere: events are stored by the broker (a quorum queue).
    assert curl(i1, "/event", "kept", f"d1@{tenant}:pw1") == "202"
    assert curl(i1, "/event", "expires", f"d1@{tenant}:pw1", headers=["hono-ttl: 1"]) == "202"
    assert mosquitto_pub(i1, tenant, "d1", "pw1", "event", "kept-mqtt").returncode == 0
    time.sleep(2.5)
    events = collect(i3, tenant, f"event/{tenant}")
    try:
        got = bodies(events, 2)
        assert sorted(got) == [b"kept", b"kept-mqtt"]
        with pytest.raises(TimeoutError):
            device_messages(events, 1, timeout=2)  # the one with a 1 s TTL expired in the broker
    finally:
        events.close()


def test_registry_writes_on_one_instance_apply_on_every_other_within_a_second(cluster):
    i1, i2 = cluster(2)
    # The third instance serves devices only: no management API (its AMQP listener stays,
    # for commands other instances hand it).
    (i3,) = cluster(1, roles=["devices"])
    assert "registry" not in i3.listeners and "http" in i3.listeners, i3.listeners
    tenant = unique_tenant()
    reg = provision(i1, tenant)
    # A device created through instance 2 authenticates at instances 1 and 3.
    Registry(i2.registry_url, TOKEN).device(tenant, "fresh", password="pw1")
    created = time.time()
    for i in (i1, i3):
        ok, took = eventually(lambda: curl(i, "/event", "hello", f"fresh@{tenant}:pw1") == "202", 1.0)
        assert ok, f"{i.name}: a device created on i2 was not accepted within 1 s"
    assert time.time() - created < 2
    # Disabled through instance 2: refused everywhere within 1 s, over every protocol.
    for i in (i1, i2, i3):  # warm every instance's credential cache first
        assert curl(i, "/event", "before", f"d1@{tenant}:pw1") == "202"
    Registry(i2.registry_url, TOKEN).set_device_enabled(tenant, "d1", False)
    for i in (i1, i2, i3):
        # 403: the device is known but disabled (as on one instance)
        ok, took = eventually(lambda: curl(i, "/event", "after", f"d1@{tenant}:pw1") in ("401", "403"), 1.0)
        assert ok, f"{i.name}: a device disabled on i2 was still accepted after {took:.2f} s"
        res = mosquitto_pub(i, tenant, "d1", "pw1", "event", "mqtt-after")
        assert res.returncode != 0, f"{i.name}: mosquitto_pub of a disabled device succeeded"
    del reg


def test_tenant_isolation_and_no_consumer_answers_on_every_instance(cluster):
    instances = cluster(3)
    a, b = unique_tenant("a"), unique_tenant("b")
    provision(instances[0], a)
    provision(instances[0], b)
    for i in instances:
        # An application of tenant A cannot attach to tenant B's addresses.
        conn = connect(i.amqp_url(a))
        try:
            for address in (f"telemetry/{b}", f"event/{b}"):
                with pytest.raises(Exception) as refused:
                    # The refusal (a detach with an error) may come just after the attach
                    # returns: reading the link sees it. A link that was let through would
                    # time out here instead, which the message check below refuses.
                    conn.create_receiver(address, credit=1).receive(timeout=5)
                assert "unauthorized" in str(refused.value).lower() or "not allowed" in str(refused.value).lower(), refused.value
        finally:
            try:
                conn.close()
            except Exception:
                pass
        # Nobody consumes tenant B's telemetry: Hono's "no consumer" answers.
        assert curl(i, "/telemetry", "x", f"d1@{b}:pw1") == "503"
        res = mosquitto_pub(i, b, "d1", "pw1", "telemetry", "x", qos=1, version="mqttv5")
        assert "Publish 1 failed" in res.stderr, ("MQTT 5 QoS 1 telemetry without a consumer was acknowledged", res.stderr)
        res = coap_post(i, b, "d1", "/telemetry", "x")
        assert "5.03" in res.stdout + res.stderr, (res.stdout, res.stderr)
    # Tenant A's application on instance 3 gets A's telemetry, and B still has no consumer.
    telemetry = collect(instances[2], a, f"telemetry/{a}")
    try:
        wait_for_lease(instances[0], a)
        assert curl(instances[0], "/telemetry", "x", f"d1@{b}:pw1") == "503"
    finally:
        telemetry.close()
    # The consumer's lease goes when it does: 503 again within the lease time.
    ok, took = eventually(lambda: curl(instances[0], "/telemetry", "y", f"d1@{a}:pw1") == "503", 8, 0.25)
    assert ok, "telemetry was still accepted 8 s after the only consumer left"


def test_a_ferrule_broker_as_the_separate_backend(cluster, tmp_path):
    """Ferrule's own broker run as its own process (applications role only) is the shared
    backend of two device-facing instances, with Hono's addresses and a `relay@*` user
    (one connection per tenant, so the backend enforces tenants too)."""
    backend = cluster(1, backend="", roles=["applications"], users=[("relay@*", "relay-secret")])[0]
    assert "http" not in backend.listeners and "mqtt" not in backend.listeners
    hono = (f'\n[messaging.backend]\nkind = "amqp"\nurls = ["amqp://{backend.listeners["amqp"]}"]\n'
            f'username = "relay@*"\npassword = "relay-secret"\naddresses = "hono"\noutcome_timeout = "5s"\n')
    f1, f2 = cluster(2, backend=hono)
    tenant = unique_tenant()
    provision(f1, tenant)
    # No application anywhere: the backend says "no consumer" itself.
    assert curl(f1, "/telemetry", "x", f"d1@{tenant}:pw1") == "503"
    # An event stored at the backend while nobody consumes...
    assert curl(f1, "/event", "stored", f"d1@{tenant}:pw1") == "202"
    # ...reaches an application on the other front instance.
    events = collect(f2, tenant, f"event/{tenant}")
    telemetry = collect(f2, tenant, f"telemetry/{tenant}")
    try:
        assert bodies(events, 1) == [b"stored"]
        wait_for_lease(f1, tenant)
        assert mosquitto_pub(f1, tenant, "d1", "pw1", "telemetry", "via-backend").returncode == 0
        got = []
        while b"via-backend" not in got:
            got.append(bytes(telemetry.next(timeout=10).body))
    finally:
        events.close()
        telemetry.close()


def test_a_broker_restart_is_never_acknowledged_falsely_and_recovers(cluster):
    """RabbitMQ stops under running instances: devices get the error answer (an unknown
    outcome is never reported as accepted) and the instances turn unready (their probe
    names the broker); once it is back, instances reconnect by themselves and turn ready,
    the application's bridge attaches again, and stored events survive."""
    i1, i2 = cluster(2)
    tenant = unique_tenant()
    provision(i1, tenant)
    events = collect(i2, tenant, f"event/{tenant}")
    try:
        assert curl(i1, "/event", "before", f"d1@{tenant}:pw1") == "202"
        assert bodies(events, 1) == [b"before"]
        assert readiness(i1) == (200, "ready\n") and readiness(i2) == (200, "ready\n")
        brokers_command("rabbit-stop", "1")
        try:
            for i in (i1, i2):
                unready, _ = eventually(lambda: readiness(i)[0] == 503, 10, 0.2)
                assert unready, f"{i.name} still ready 10 s after the broker stopped"
                assert readiness(i) == (503, "the shared broker is unreachable\n")
            codes = [curl(i1, "/event", f"down-{k}", f"d1@{tenant}:pw1") for k in range(3)]
            assert codes == ["503"] * 3, codes
            res = mosquitto_pub(i1, tenant, "d1", "pw1", "event", "down-mqtt", version="mqttv5")
            assert "Publish 1 failed" in res.stderr or res.returncode != 0, res.stderr
        finally:
            brokers_command("rabbit-start", "1", keep=True)
        ok, took = eventually(lambda: curl(i1, "/event", "after", f"d1@{tenant}:pw1") == "202", 30, 0.5)
        assert ok, "events were not accepted again within 30 s of the broker's restart"
        for i in (i1, i2):
            ready, _ = eventually(lambda: readiness(i) == (200, "ready\n"), 30, 0.2)
            assert ready, f"{i.name} not ready again 30 s after the broker's restart"
        seen = []
        while b"after" not in seen:  # at least once: an unknown outcome may have been stored
            seen.append(bytes(device_messages(events, 1, timeout=30)[0].body))
    finally:
        events.close()


def metric(instance, name, **labels):
    """A counter of `instance`'s /metrics (0 if absent)."""
    import urllib.request
    with urllib.request.urlopen(f"http://{instance.listeners['ops']}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_password_verifiers_are_shared_through_redis(cluster, tmp_path):
    """With one `[registry] verifier_key_file` for every instance, a device's first login
    (on instance 1) runs argon2id once; an instance that never saw the device (its own
    fresh data directory, as a new pod has) accepts its login from the verifier kept in
    Redis, without argon2; a wrong password there still runs argon2 and is refused; a
    changed password makes the shared verifier inert; deleting the tenant deletes it."""
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "verifier.key").write_bytes(os.urandom(32))
    i1, i2 = cluster(2, registry_extra=f'verifier_key_file = "{keys / "verifier.key"}"')
    tenant = unique_tenant()
    reg = provision(i1, tenant)
    hashed = lambda i: metric(i, "ferrule_password_checks_total", method="hash")
    verified = lambda i: metric(i, "ferrule_password_checks_total", method="verifier")

    assert curl(i1, "/event", "first", f"d1@{tenant}:pw1") == "202"
    assert (hashed(i1), verified(i1)) == (1, 0)
    assert curl(i2, "/event", "second", f"d1@{tenant}:pw1") == "202"
    assert (hashed(i2), verified(i2)) == (0, 1), "the verifier from Redis, no argon2 run"
    assert curl(i2, "/event", "x", f"d1@{tenant}:wrong") == "401"
    assert hashed(i2) == 1, "a wrong password runs argon2"

    reg.call("PUT", f"/v1/credentials/{tenant}/d1",
             [{"type": "hashed-password", "auth-id": "d1", "secrets": [{"pwd-plain": "pw2"}]}])
    ok, _ = eventually(lambda: curl(i2, "/event", "x", f"d1@{tenant}:pw1") == "401", 2, 0.1)
    assert ok, "the old password is refused on instance 2"
    assert curl(i2, "/event", "third", f"d1@{tenant}:pw2") == "202"
    assert hashed(i2) >= 3, "a new hash record: the shared verifier was inert"

    key = f"{i1.prefix}:{{{tenant}}}:v"
    exists = lambda: subprocess.run(["redis-cli", "-c", "-p", "27001", "EXISTS", key],
                                    capture_output=True, text=True, timeout=10).stdout.strip()
    assert exists() == "1"
    reg.call("DELETE", f"/v1/tenants/{tenant}")
    assert exists() == "0", "deleting the tenant deletes its verifiers"


def test_amqps_to_the_broker_checks_its_certificate(cluster, tmp_path):
    """amqps:// to RabbitMQ's TLS listener with the operator's CA: events flow. With a CA
    that did not sign the broker's certificate nothing is acknowledged (503)."""
    pki = Path(os.environ["FERRULE_CLUSTER_BASE"]) / "pki"
    tls_backend = RABBIT_BACKEND.format(amqp="unused", http=RABBIT_HTTP).replace(
        'urls = ["amqp://unused"]', f'urls = ["amqps://{RABBIT_AMQPS}"]\ntls_ca_file = "{pki / "ca.crt"}"')
    (i1,) = cluster(1, backend=tls_backend)
    tenant = unique_tenant()
    provision(i1, tenant)
    events = collect(i1, tenant, f"event/{tenant}")
    try:
        assert curl(i1, "/event", "over-tls", f"d1@{tenant}:pw1") == "202"
        assert bodies(events, 1) == [b"over-tls"]
    finally:
        events.close()
    from tls_support import make_pki
    other = make_pki(tmp_path / "other-ca")
    wrong = tls_backend.replace(str(pki / "ca.crt"), str(other["ca"]))
    (i2,) = cluster(1, backend=wrong)
    assert curl(i2, "/event", "untrusted", f"d1@{tenant}:pw1") == "503"
    assert "TLS" in i2.log_text() and "cannot attach" in i2.log_text()
