"""TLS listeners with independent clients."""
from proton import Message, SSLDomain
from proton.utils import BlockingConnection

from conftest import Platform, USERS
from tls_support import make_pki


def test_amqps_with_python_qpid_proton(tmp_path):
    pki = make_pki(tmp_path / "pki")
    p = Platform(tmp_path / "data", extra=f"""
[messaging.tls]
cert = "{pki['cert']}"
key = "{pki['key']}"
""").start()
    try:
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
    finally:
        assert p.stop() == 0


def test_https_adapter_with_curl(tmp_path):
    import subprocess

    from amqp_client import Collector
    from registry_client import Registry

    pki = make_pki(tmp_path / "pki")
    p = Platform(tmp_path / "data", extra=f"""
[adapters.http.tls]
cert = "{pki['cert']}"
key = "{pki['key']}"
""").start()
    try:
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
        app.close()
    finally:
        assert p.stop() == 0


def test_management_api_over_tls_with_curl(tmp_path):
    import subprocess

    pki = make_pki(tmp_path / "pki")
    p = Platform(tmp_path / "data", extra=f"""
[registry.tls]
cert = "{pki['cert']}"
key = "{pki['key']}"
""").start()
    try:
        port = p.listeners["registry"].rsplit(":", 1)[1]
        base = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                "-H", f"authorization: Bearer {p.registry_token}", "-H", "content-type: application/json",
                "--data", "{}", f"https://localhost:{port}/v1/tenants/tls-tenant"]
        res = subprocess.run(base + ["--cacert", str(pki["ca"])], capture_output=True, text=True, timeout=20)
        assert res.stdout == "201", res.stderr
        res = subprocess.run(base, capture_output=True, text=True, timeout=20)
        assert res.returncode == 60, (res.returncode, res.stdout)
    finally:
        assert p.stop() == 0
