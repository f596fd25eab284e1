"""X.509 rules of issue 17 against a real `ferrule serve`, with certificates made by the
openssl command line tool and presented by curl to the HTTPS adapter: only client
certificates log in as devices (not a CA certificate, not one whose KeyUsage lacks
digitalSignature or whose ExtendedKeyUsage lacks clientAuth), a trusted CA's subject DN
belongs to one tenant (409), OCSP is refused until implemented (400)."""
import base64
import subprocess

from test_tls import tls_platform
from tls_support import make_device_ca, make_device_cert, openssl


def issue(directory, ca, name, subject, extensions):
    """A certificate for a fresh P-256 key, issued by `ca` with exactly `extensions`
    (openssl extension-file lines)."""
    d = directory
    (d / f"{name}.ext").write_text(extensions)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca["crt"]), "-CAkey", str(ca["key"]),
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return {"crt": d / f"{name}.crt", "key": d / f"{name}.key"}


def rfc2253(cert):
    out = subprocess.run(["openssl", "x509", "-in", str(cert["crt"]), "-noout", "-subject", "-nameopt", "RFC2253"],
                         capture_output=True, text=True, check=True).stdout
    return out.strip().removeprefix("subject=")


def test_only_client_certificates_log_in_and_cas_belong_to_one_tenant(tmp_path):
    from amqp_client import Collector
    from registry_client import Registry

    certs = tmp_path / "devices"
    ca = make_device_ca(certs)
    good = make_device_cert(certs, ca, "good", "/O=Ferrule Test/CN=Good")
    sub_ca = issue(certs, ca, "subca", "/O=Ferrule Test/CN=Sub CA",
                   "basicConstraints=critical,CA:TRUE\nkeyUsage=digitalSignature,keyCertSign\n"
                   "extendedKeyUsage=clientAuth\n")
    no_ds = issue(certs, ca, "nods", "/O=Ferrule Test/CN=No DS",
                  "basicConstraints=CA:FALSE\nkeyUsage=keyAgreement\nextendedKeyUsage=clientAuth\n")
    server = issue(certs, ca, "server", "/O=Ferrule Test/CN=Server Only",
                   "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
    ca_der = base64.b64encode(ca["der"]).decode()

    with tls_platform(tmp_path, "adapters.http.tls") as (pki, p):
        reg = Registry(p.registry_url, p.registry_token)
        reg.call("POST", "/v1/tenants/t1", {"trusted-ca": [{"cert": ca_der}]})
        # Every certificate's subject is a registered device: only the profile decides.
        devices = {"good": good, "subca": sub_ca, "nods": no_ds, "server": server, "root": ca}
        for device, cert in devices.items():
            reg.device("t1", device)
            reg.call("PUT", f"/v1/credentials/t1/{device}", [{"type": "x509-cert", "auth-id": rfc2253(cert)}])

        # Another tenant cannot register the same CA (on create or update); OCSP is refused.
        status, body = reg.call("POST", "/v1/tenants/t2", {"trusted-ca": [{"cert": ca_der}]}, expect=(409,))
        assert body["subject-dn"] == rfc2253(ca), body
        reg.call("POST", "/v1/tenants/t2", {})
        reg.call("PUT", "/v1/tenants/t2", {"trusted-ca": [{"cert": ca_der}]}, expect=(409,))
        status, body = reg.call("PUT", "/v1/tenants/t1",
                                {"trusted-ca": [{"cert": ca_der, "ocsp-revocation-enabled": True}]}, expect=(400,))
        assert "OCSP revocation checking is not implemented" in body["error"], body
        reg.call("PUT", "/v1/tenants/t1", {"trusted-ca": [{"cert": ca_der}]})

        app = Collector(p.url("t1"), "telemetry/t1")
        app.start()
        https_port = p.listeners["https"].rsplit(":", 1)[1]

        def curl(cert, message):
            return subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(pki["ca"]),
                                   "-H", "content-type: text/plain", "-H", "QoS-Level: 1", "--data-binary", message,
                                   "--cert", str(cert["crt"]), "--key", str(cert["key"]),
                                   f"https://localhost:{https_port}/telemetry"],
                                  capture_output=True, text=True, timeout=20)

        res = curl(good, "from a client certificate")
        assert res.stdout == "202", (res.returncode, res.stdout, res.stderr)
        m = app.next(timeout=10)
        assert (bytes(m.body).decode(), m.properties["device_id"]) == ("from a client certificate", "good")

        # Refused after the handshake, as a bad certificate is: 401.
        for device in ("subca", "nods", "server", "root"):
            res = curl(devices[device], f"from {device}")
            assert res.stdout == "401", (device, res.returncode, res.stdout, res.stderr)
        try:
            extra = app.next(timeout=1)
            raise AssertionError(f"unexpected message {extra.body!r}")
        except TimeoutError:
            pass
        app.close()
