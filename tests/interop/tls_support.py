"""Throw-away PKI for TLS tests, made with the openssl command line tool."""
import subprocess
from pathlib import Path


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path, cn="localhost"):
    """A CA and a server certificate for `cn` (SAN localhost and 127.0.0.1) signed by it."""
    d = directory
    d.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=Ferrule Test CA", cwd=d)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={cn}", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    return {"ca": d / "ca.crt", "cert": d / "server.crt", "key": d / "server.key"}


CA_CONFIG = """[ ca ]
default_ca = devices
[ devices ]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = anything
unique_subject = no
preserve = yes
copy_extensions = none
x509_extensions = device
[ device ]
basicConstraints = CA:FALSE
keyUsage = digitalSignature
extendedKeyUsage = clientAuth
[ anything ]
commonName = supplied
organizationName = optional
countryName = optional
"""


def make_device_ca(directory: Path, name="ca", subject="/O=Ferrule Test/CN=Device CA"):
    """A CA for device certificates (what a tenant registers as its trusted CA)."""
    d = directory
    d.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", subject, cwd=d)
    openssl("x509", "-in", f"{name}.crt", "-outform", "DER", "-out", f"{name}.der", cwd=d)
    return {"crt": d / f"{name}.crt", "key": d / f"{name}.key", "der": (d / f"{name}.der").read_bytes()}


def make_device_cert(directory: Path, ca, name, subject, start="-1d", end="+2d"):
    """A device certificate issued by `ca` (from make_device_ca), valid from `start` to
    `end` (openssl ca dates: YYYYMMDDHHMMSSZ, or the relative shorthands below)."""
    import datetime

    def when(spec):
        if spec[0] in "+-":
            days = int(spec[:-1])
            t = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days)
            return t.strftime("%Y%m%d%H%M%SZ")
        return spec

    d = directory
    (d / "ca.cnf").write_text(CA_CONFIG)
    if not (d / "index.txt").exists():
        (d / "index.txt").write_text("")
        (d / "serial").write_text("1000\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=d)
    openssl("ca", "-batch", "-config", "ca.cnf", "-cert", str(ca["crt"]), "-keyfile", str(ca["key"]),
            "-in", f"{name}.csr", "-out", f"{name}.crt", "-notext",
            "-startdate", when(start), "-enddate", when(end), cwd=d)
    return {"crt": d / f"{name}.crt", "key": d / f"{name}.key"}
