"""TLS listeners with independent clients."""
import contextlib

from proton import Message, SSLDomain
from proton.utils import BlockingConnection

from conftest import Platform, USERS
from tls_support import make_pki


@contextlib.contextmanager
def tls_platform(tmp_path, *sections):
    """A started Platform with a fresh PKI's server certificate and key in each config
    section (e.g. "messaging.tls"); yields (pki, platform) and stops it cleanly after."""
    pki = make_pki(tmp_path / "pki")
    extra = "".join(f"""
[{section}]
cert = "{pki['cert']}"
key = "{pki['key']}"
""" for section in sections)
    p = Platform(tmp_path / "data", extra=extra).start()
    try:
        yield pki, p
    finally:
        assert p.stop() == 0


def test_amqps_with_python_qpid_proton(tmp_path):
    with tls_platform(tmp_path, "messaging.tls") as (pki, p):
        domain = SSLDomain(SSLDomain.MODE_CLIENT)
        domain.set_trusted_ca_db(str(pki["ca"]))
        domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
        user, password = USERS["t1"]
        host, port = p.listeners["amqps"].rsplit(":", 1)
        url = f"amqps://{user.replace('@', '%40')}:{password}@localhost:{port}"
        conn = BlockingConnection(url, ssl_domain=domain, timeout=10, allowed_mechs="PLAIN")
        conn.create_sender("event/t1", name="tls-s").send(Message(body="over tls", durable=True))
        r = conn.create_receiver("event/t1", name="tls-r")
        assert r.receive(timeout=5).body == "over tls"
        r.accept()
        conn.close()
        # A client that does not trust the server's CA is refused by its own TLS check.
        untrusting = SSLDomain(SSLDomain.MODE_CLIENT)
        untrusting.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
        try:
            BlockingConnection(url, ssl_domain=untrusting, timeout=5, allowed_mechs="PLAIN").close()
            raise AssertionError("connected without trusting the server certificate")
        except AssertionError:
            raise
        except Exception:
            pass


def test_https_adapter_with_curl(tmp_path):
    import subprocess

    from amqp_client import Collector
    from registry_client import Registry

    with tls_platform(tmp_path, "adapters.http.tls") as (pki, p):
        Registry(p.registry_url, p.registry_token).tenant("t1").device("t1", "d1", password="pw1")
        app = Collector(p.url("t1"), "telemetry/t1")
        app.start()
        port = p.listeners["https"].rsplit(":", 1)[1]
        url = f"https://localhost:{port}/telemetry"
        base = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", "d1@t1:pw1", "-H", "QoS-Level: 1",
                "-H", "content-type: text/plain", "--data-binary", "over https"]
        res = subprocess.run(base + ["--cacert", str(pki["ca"]), url], capture_output=True, text=True, timeout=20)
        assert res.stdout == "202", res.stderr
        assert bytes(app.next(timeout=10).body) == b"over https"
        # Without the CA, curl refuses the server certificate (exit 60).
        res = subprocess.run(base + [url], capture_output=True, text=True, timeout=20)
        assert res.returncode == 60, (res.returncode, res.stdout)

        # Hot rotation: new files from another CA are picked up without a restart.
        import os
        import time
        new = make_pki(tmp_path / "pki2")
        for part in ("key", "cert"):
            staged = pki[part].with_suffix(".new")
            staged.write_bytes(new[part].read_bytes())
            os.replace(staged, pki[part])
        deadline = time.time() + 15
        while True:
            res = subprocess.run(base + ["--cacert", str(new["ca"]), url], capture_output=True, text=True, timeout=20)
            if res.stdout == "202" or time.time() > deadline:
                break
            time.sleep(0.3)
        assert res.stdout == "202", (res.returncode, res.stderr)
        res = subprocess.run(base + ["--cacert", str(pki["ca"]), url], capture_output=True, text=True, timeout=20)
        assert res.returncode == 60, "the old CA must no longer verify the server"
        assert "TLS certificate reloaded" in p.log_text()
        app.close()


def test_management_api_over_tls_with_curl(tmp_path):
    import subprocess

    with tls_platform(tmp_path, "registry.tls") as (pki, p):
        port = p.listeners["registry"].rsplit(":", 1)[1]
        base = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                "-H", f"authorization: Bearer {p.registry_token}", "-H", "content-type: application/json",
                "--data", "{}", f"https://localhost:{port}/v1/tenants/tls-tenant"]
        res = subprocess.run(base + ["--cacert", str(pki["ca"])], capture_output=True, text=True, timeout=20)
        assert res.stdout == "201", res.stderr
        res = subprocess.run(base, capture_output=True, text=True, timeout=20)
        assert res.returncode == 60, (res.returncode, res.stdout)


def test_device_x509_and_tls_with_mosquitto_and_curl(tmp_path):
    """MQTT over TLS (8883) and HTTPS with X.509 client certificates: devices are found by
    their certificate's subject DN in the tenant whose trusted CA issued it; a certificate
    from another CA (even one with the same name) or an expired one is refused."""
    import base64
    import subprocess

    from amqp_client import Collector
    from registry_client import Registry
    from tls_support import make_device_ca, make_device_cert

    certs = tmp_path / "devices"
    ca = make_device_ca(certs)
    rogue = make_device_ca(certs / "rogue")  # same subject DN, different key
    d1 = make_device_cert(certs, ca, "d1", "/O=Ferrule Test/CN=Device 1")
    d2 = make_device_cert(certs, ca, "d2", "/O=Ferrule Test/CN=Device 2")
    impostor = make_device_cert(certs / "rogue", rogue, "imp", "/O=Ferrule Test/CN=Device 1")
    expired = make_device_cert(certs, ca, "old", "/O=Ferrule Test/CN=Device 1", start="-10d", end="-1d")
    with tls_platform(tmp_path, "adapters.mqtt.tls", "adapters.http.tls") as (pki, p):
        reg = Registry(p.registry_url, p.registry_token)
        reg.call("POST", "/v1/tenants/t1", {"trusted-ca": [{"cert": base64.b64encode(ca["der"]).decode()}]})
        # d1 by its subject DN (RFC 2253), d2 by its certificate, d3 by password.
        reg.device("t1", "d1").device("t1", "d2").device("t1", "d3", password="pw3")
        def rfc2253(cert):
            out = subprocess.run(["openssl", "x509", "-in", str(cert["crt"]), "-noout", "-subject", "-nameopt", "RFC2253"],
                                 capture_output=True, text=True, check=True).stdout
            return out.strip().removeprefix("subject=")

        # The auth-id is the subject DN as OpenSSL prints it in RFC 2253 form.
        reg.call("PUT", "/v1/credentials/t1/d1", [{"type": "x509-cert", "auth-id": rfc2253(d1)}])
        der2 = subprocess.run(["openssl", "x509", "-in", str(d2["crt"]), "-outform", "DER"],
                              capture_output=True, check=True).stdout
        reg.call("PUT", "/v1/credentials/t1/d2", [{"type": "x509-cert", "cert": base64.b64encode(der2).decode()}])
        _, stored = reg.call("GET", "/v1/credentials/t1/d2")
        assert stored[0]["auth-id"] == rfc2253(d2), stored

        app = Collector(p.url("t1"), "telemetry/t1")
        app.start()
        mqtt_port = p.listeners["mqtts"].rsplit(":", 1)[1]
        https_port = p.listeners["https"].rsplit(":", 1)[1]

        def mosquitto(*args, message):
            return subprocess.run(["mosquitto_pub", "-h", "localhost", "-p", mqtt_port, "--cafile", str(pki["ca"]),
                                   "-t", "telemetry", "-q", "1", "-m", message, *args],
                                  capture_output=True, text=True, timeout=20)

        def curl(*args, message):
            return subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(pki["ca"]),
                                   "-H", "content-type: text/plain", "-H", "QoS-Level: 1", "--data-binary", message,
                                   *args, f"https://localhost:{https_port}/telemetry"],
                                  capture_output=True, text=True, timeout=20)

        # Password over TLS, then client certificates.
        res = mosquitto("-u", "d3@t1", "-P", "pw3", message="mqtts password")
        assert res.returncode == 0, res.stderr
        res = mosquitto("--cert", str(d1["crt"]), "--key", str(d1["key"]), message="mqtts cert")
        assert res.returncode == 0, res.stderr
        res = curl("--cert", str(d2["crt"]), "--key", str(d2["key"]), message="https cert")
        assert res.stdout == "202", (res.returncode, res.stdout, res.stderr)
        got = {}
        for _ in range(3):
            m = app.next(timeout=10)
            got[bytes(m.body).decode()] = m.properties["device_id"]
        assert got == {"mqtts password": "d3", "mqtts cert": "d1", "https cert": "d2"}, got

        # Same subject and issuer name, wrong key: refused after the handshake.
        res = mosquitto("--cert", str(impostor["crt"]), "--key", str(impostor["key"]), message="impostor")
        assert res.returncode != 0 and "connection refused: bad user name or password" in res.stderr.lower(), res
        res = curl("--cert", str(impostor["crt"]), "--key", str(impostor["key"]), message="impostor")
        assert res.stdout == "401", (res.returncode, res.stdout, res.stderr)
        # Expired: refused in the TLS handshake (certificate_expired alert).
        res = mosquitto("--cert", str(expired["crt"]), "--key", str(expired["key"]), message="expired")
        assert res.returncode != 0, res
        res = curl("--cert", str(expired["crt"]), "--key", str(expired["key"]), message="expired")
        assert res.returncode != 0 and res.stdout != "202", (res.returncode, res.stdout, res.stderr)
        # Nothing from the refused clients reached the application.
        try:
            extra = app.next(timeout=1)
            raise AssertionError(f"unexpected message {extra.body!r}")
        except TimeoutError:
            pass
        app.close()
        assert "BEGIN" not in p.log_text()
