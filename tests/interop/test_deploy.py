"""deploy/ stays valid: Kubernetes manifests against the API schemas, compose as YAML, and
the Ferrule configurations they carry through `ferrule config check`.

The cluster-mode compose topology cannot run here without a Docker engine; the last test
runs its Ferrule configuration natively instead (3 instances over a local RabbitMQ and a
3-node Redis Cluster from tests/cluster/brokers.sh) and drives deploy/compose/smoke.sh
against them. It is skipped where rabbitmq-server or redis-server is missing."""
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CLUSTER_MANIFEST = DEPLOY / "kubernetes" / "ferrule-cluster.yaml"
CLUSTER_COMPOSE = DEPLOY / "compose" / "cluster.yaml"
FERRULE_SERVICES = ["ferrule-1", "ferrule-2", "ferrule-3"]


def config_check(bin_path, config_path, env=None):
    """`ferrule config check` with exactly `env`'s FERRULE__ variables (none inherited)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FERRULE__")}
    return subprocess.run([str(bin_path), "config", "check", "--config", str(config_path)],
                          capture_output=True, text=True, env={**base, **(env or {})}, timeout=60)


def test_kubernetes_manifests_validate():
    res = subprocess.run(
        ["kubernetes-validate", "--strict", str(DEPLOY / "kubernetes" / "ferrule.yaml")],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "ferrule.yaml").read_text())]
    assert {"StatefulSet", "Service", "ConfigMap", "Secret"} <= set(kinds)


def test_manifest_config_is_a_valid_ferrule_config(tmp_path):
    from conftest import BIN
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "ferrule.yaml").read_text()))
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["ferrule.toml"]
    path = tmp_path / "ferrule.toml"
    path.write_text(config)
    res = config_check(BIN, path)
    assert res.returncode == 0, res.stderr


def test_compose_file_parses():
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    assert compose["services"]["ferrule"]["build"]["dockerfile"] == "deploy/Dockerfile"


# --- cluster mode: Kubernetes -------------------------------------------------------------

def cluster_docs():
    return list(yaml.safe_load_all(CLUSTER_MANIFEST.read_text()))


def one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


def resolve_pod_env(container, docs, pod_name, pod_ip):
    """The environment Kubernetes gives the container: fieldRefs as a pod named `pod_name`
    at `pod_ip`, secretKeyRefs from the manifest's Secret, `$(VAR)` expanded from the
    variables defined before (as the kubelet does)."""
    secrets = {d["metadata"]["name"]: {**{k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()},
                                       **(d.get("stringData") or {})}
               for d in docs if d["kind"] == "Secret"}
    fields = {"metadata.name": pod_name, "status.podIP": pod_ip}
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                      lambda m: env.get(m.group(1), m.group(0)), var["value"])
        elif "fieldRef" in var["valueFrom"]:
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["key"] in secrets[ref["name"]], f"{var['name']}: no key {ref['key']} in {ref['name']}"
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def test_cluster_manifest_validates_and_has_every_part():
    res = subprocess.run(["kubernetes-validate", "--strict", str(CLUSTER_MANIFEST)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    docs = cluster_docs()
    assert all("namespace" not in d["metadata"] for d in docs), "namespace is left to kubectl -n"
    kinds = [d["kind"] for d in docs]
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Secret"} <= set(kinds)
    assert "StatefulSet" not in kinds and "PersistentVolumeClaim" not in kinds

    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] >= 3
    labels = deployment["spec"]["selector"]["matchLabels"]
    pod = deployment["spec"]["template"]["spec"]
    assert labels.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (container,) = pod["containers"]
    ports = {p["name"]: (p["containerPort"], p["protocol"]) for p in container["ports"]}

    # Every Service (and the PDB) selects these pods, and names ports the container has.
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for name, svc in services.items():
        assert svc["spec"]["selector"] == labels, name
        for p in svc["spec"]["ports"]:
            assert ports[p["targetPort"]][1] == p["protocol"], (name, p)
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == labels
    by_port = {(p["port"], p["protocol"]): name for name, s in services.items() for p in s["spec"]["ports"]}
    devices = {by_port[(1883, "TCP")], by_port[(8883, "TCP")], by_port[(8080, "TCP")], by_port[(8443, "TCP")],
               by_port[(5683, "UDP")], by_port[(5684, "UDP")]}
    assert len(devices) == 1, devices
    assert services[devices.pop()]["spec"]["type"] == "LoadBalancer"
    assert {by_port[(5672, "TCP")], by_port[(5671, "TCP")]} <= {"ferrule-cluster-applications", "ferrule-cluster-pods"}
    assert by_port[(28080, "TCP")] == "ferrule-cluster-management"

    # Probes on the ops port; drain time above the platform's 10 s per tier; non-root,
    # read-only root file system; the data directory an emptyDir.
    assert ports["ops"][0] == 8088
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "ops"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "ops"}
    assert pod["terminationGracePeriodSeconds"] > 4 * 10
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    data_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/var/lib/ferrule")
    assert "emptyDir" in volumes[data_mount["name"]]
    assert pod["topologySpreadConstraints"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]

    # Secrets are placeholders, recognisably so.
    secret = one(docs, "Secret")
    assert secret["stringData"] and all("change-me" in v for v in secret["stringData"].values())


def test_cluster_manifest_config_is_valid_per_pod(tmp_path):
    """The ConfigMap's ferrule.toml passes `ferrule config check` with the environment
    each pod gets (and not without the shared secrets); the per-pod keys come out per
    pod."""
    from conftest import BIN
    docs = cluster_docs()
    path = tmp_path / "ferrule.toml"
    path.write_text(one(docs, "ConfigMap")["data"]["ferrule.toml"])
    # On its own it lacks what the Secret gives every pod alike (a shared broker needs
    # the one request-id key of the deployment): refused, naming it.
    alone = config_check(BIN, path)
    assert alone.returncode != 0 and "request_id_key" in alone.stderr, alone.stderr

    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["serve", "--config", "/etc/ferrule/ferrule.toml"]
    for pod_name, pod_ip in [("ferrule-cluster-6d5c8b7f4-x2x7k", "10.42.0.17"), ("ferrule-cluster-6d5c8b7f4-qz9rt", "10.42.1.5")]:
        env = resolve_pod_env(container, docs, pod_name, pod_ip)
        assert not any("$(" in v for v in env.values()), env
        res = config_check(BIN, path, {k: v for k, v in env.items() if k.startswith("FERRULE__")})
        assert res.returncode == 0, res.stderr
        out = res.stdout
        assert 'kind = "amqp"' in out and 'storage = "redis"' in out
        assert f'instance_id = "{pod_name}"' in out
        assert f'advertise = "{pod_ip}:5672"' in out
        # Secrets arrived (and are redacted in the printout).
        for key in ["peer_password", "request_id_key"]:
            assert re.search(rf'^{key} = "<redacted>"', out, re.M), key
        assert not re.search(r'^(management_)?password = ""', out, re.M), "broker passwords unset"
        assert 'auth_tokens = ["<redacted>"]' in out
        assert 'username = "app@*"' in out
        assert 'redis_urls = ["redis://:<redacted>@redis-cluster:6379/"]' in out
        assert 'listen = "0.0.0.0:8088"' in out


# --- cluster mode: compose ----------------------------------------------------------------

def compose():
    return yaml.safe_load(CLUSTER_COMPOSE.read_text())


def mounted_config(service):
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if target == "/etc/ferrule/ferrule.toml":
            return (CLUSTER_COMPOSE.parent / source).resolve()
    raise AssertionError("no /etc/ferrule/ferrule.toml mounted")


def host_ports(service):
    """(host ip, host port, protocol) of each published port."""
    out = []
    for entry in service.get("ports", []):
        spec, _, proto = str(entry).partition("/")
        parts = spec.split(":")
        ip = parts[0] if len(parts) == 3 else "0.0.0.0"
        out.append((ip, int(parts[-2]), proto or "tcp"))
    return out


def test_compose_cluster_file_has_the_topology():
    c = compose()
    services = c["services"]
    ferrules = sorted(name for name, s in services.items() if "ferrule" in str(s.get("image", "")))
    assert ferrules == FERRULE_SERVICES
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.")
    redis_nodes = sorted(n for n, s in services.items() if str(s.get("image", "")).startswith("redis:") and n != "redis-init")
    assert redis_nodes == ["redis-1", "redis-2", "redis-3"]
    for n in redis_nodes:
        assert "--cluster-enabled" in services[n]["command"] and "healthcheck" in services[n]
    init = " ".join(services["redis-init"]["command"])
    assert "--cluster create" in init and services["redis-init"]["restart"] == "no"
    plugins = (CLUSTER_COMPOSE.parent / "rabbitmq" / "enabled_plugins").read_text()
    assert "rabbitmq_amqp1_0" in plugins and "rabbitmq_management" in plugins
    assert any(v.startswith("./rabbitmq/enabled_plugins:/etc/rabbitmq/enabled_plugins") for v in services["rabbitmq"]["volumes"])
    assert "healthcheck" in services["rabbitmq"]

    seen_ports, ids, advertised = set(), set(), set()
    for name in ferrules:
        s = services[name]
        assert s["build"]["dockerfile"] == "deploy/Dockerfile" and s["build"]["context"] == "../.."
        assert s["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        assert s["depends_on"]["redis-init"]["condition"] == "service_completed_successfully"
        assert "healthcheck" in s and "/health/ready" in " ".join(s["healthcheck"]["test"])
        ids.add(s["environment"]["FERRULE__CLUSTER__INSTANCE_ID"])
        advertised.add(s["environment"]["FERRULE__CLUSTER__ADVERTISE"])
        assert s["environment"]["FERRULE__CLUSTER__ADVERTISE"] == f"{s['hostname']}:5672"
        assert mounted_config(s) == mounted_config(services["ferrule-1"])
        for port in host_ports(s):
            assert (port[1], port[2]) not in seen_ports, (name, port)
            seen_ports.add((port[1], port[2]))
    assert len(ids) == 3 and len(advertised) == 3
    for port in host_ports(services["rabbitmq"]):
        assert (port[1], port[2]) not in seen_ports


def test_compose_cluster_config_is_valid(tmp_path):
    """The mounted ferrule.toml with each instance's environment passes `config check`, and
    names the compose services as its broker and Redis nodes."""
    from conftest import BIN
    c = compose()
    services = c["services"]
    for name in FERRULE_SERVICES:
        env = {k: str(v) for k, v in services[name]["environment"].items()}
        res = config_check(BIN, mounted_config(services[name]), env)
        assert res.returncode == 0, res.stderr
        assert f'instance_id = "{name}"' in res.stdout
        assert f'advertise = "{name}:5672"' in res.stdout
    text = mounted_config(services["ferrule-1"]).read_text()
    assert "amqp://rabbitmq:5672" in text and "http://rabbitmq:15672" in text
    for n in ["redis-1", "redis-2", "redis-3"]:
        assert f"redis://{n}:6379/" in text
    # The broker user the config logs in as is the one compose creates.
    rabbit_env = services["rabbitmq"]["environment"]
    assert f'username = "{rabbit_env["RABBITMQ_DEFAULT_USER"]}"' in text
    assert f'password = "{rabbit_env["RABBITMQ_DEFAULT_PASS"]}"' in text


# --- cluster mode: the compose configuration run natively ---------------------------------

BROKERS = ROOT / "tests" / "cluster" / "brokers.sh"
# Private ports, apart from tests/cluster's (which may run at the same time) and below the
# ephemeral range (32768-60999), where client sockets could hold them.
NATIVE = {"RABBIT_PORT": 26680, "RABBIT_HTTP_PORT": 26690, "RABBIT_DIST_PORT": 26700,
          "RABBIT_TLS_PORT": 26670, "EPMD_PORT": 26369, "REDIS_PORT": 29000}


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rabbit_api(method, path, body=None, user="guest", password="guest"):
    req = urllib.request.Request(f"http://127.0.0.1:{NATIVE['RABBIT_HTTP_PORT'] + 1}{path}",
                                 data=None if body is None else json.dumps(body).encode(), method=method)
    req.add_header("authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    req.add_header("content-type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


@pytest.mark.skipif(shutil.which("redis-server") is None or not Path("/usr/lib/rabbitmq").exists(),
                    reason="needs redis-server and rabbitmq-server (Debian packages)")
def test_compose_cluster_config_serves_natively(tmp_path):
    """deploy/compose/ferrule-cluster.toml with each compose instance's environment, run as
    3 local processes over RabbitMQ (user and password as compose's rabbitmq service makes
    them) and a 3-master Redis Cluster; only what Docker would supply differs: the
    services' host names become 127.0.0.1 ports, listeners and advertise get free loopback
    ports, data_dir a temporary directory. Then deploy/compose/smoke.sh runs against them,
    the compose healthcheck command is tried on each, and one instance is stopped with
    SIGTERM (its drain time is what the stop grace periods must cover)."""
    from conftest import BIN
    c = compose()
    services = c["services"]
    env = {**os.environ, **{k: str(v) for k, v in NATIVE.items()}, "BASE": str(tmp_path / "brokers"), "KEEP": "0"}
    env.pop("RABBIT_TLS_DIR", None)

    def brokers(*args):
        subprocess.run([str(BROKERS), *args], check=True, timeout=120, env=env)

    taken = []
    for port in [NATIVE["RABBIT_PORT"] + 1, NATIVE["RABBIT_HTTP_PORT"] + 1, NATIVE["RABBIT_DIST_PORT"] + 1,
                 NATIVE["EPMD_PORT"], *(NATIVE["REDIS_PORT"] + i for i in (1, 2, 3))]:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                taken.append(port)
    assert not taken, f"ports in use (another run of this test?): {taken}"

    instances, logs = [], []
    brokers("redis-start", "3", "0")
    try:
        brokers("rabbit-start", "1")
        rabbit_env = services["rabbitmq"]["environment"]
        user, password = rabbit_env["RABBITMQ_DEFAULT_USER"], rabbit_env["RABBITMQ_DEFAULT_PASS"]
        rabbit_api("PUT", f"/api/users/{user}", {"password": password, "tags": "administrator"})
        rabbit_api("PUT", f"/api/permissions/%2F/{user}", {"configure": ".*", "write": ".*", "read": ".*"})

        redis = json.dumps([f"redis://127.0.0.1:{NATIVE['REDIS_PORT'] + i}/" for i in (1, 2, 3)])
        ports = {}
        for name in FERRULE_SERVICES:
            s = services[name]
            p = {k: free_port() for k in ("ops", "amqp", "http", "mqtt", "registry")}
            p["coaps"] = free_port(socket.SOCK_DGRAM)
            ports[name] = p
            data = tmp_path / name
            data.mkdir(mode=0o700)
            run_env = {k: v for k, v in os.environ.items() if not k.startswith("FERRULE__")}
            run_env.update({k: str(v) for k, v in s["environment"].items()})
            run_env.update({
                "FERRULE__DATA_DIR": str(data),
                "FERRULE__MESSAGING__BACKEND__URLS": f'["amqp://127.0.0.1:{NATIVE["RABBIT_PORT"] + 1}"]',
                "FERRULE__MESSAGING__BACKEND__MANAGEMENT_URL": f"http://127.0.0.1:{NATIVE['RABBIT_HTTP_PORT'] + 1}",
                "FERRULE__CLUSTER__REDIS_URLS": redis,
                "FERRULE__REGISTRY__REDIS_CLUSTER_NODES": redis,
                "FERRULE__CLUSTER__ADVERTISE": f"127.0.0.1:{p['amqp']}",
                "FERRULE__OPS__LISTEN": f"127.0.0.1:{p['ops']}",
                "FERRULE__MESSAGING__LISTEN": f"127.0.0.1:{p['amqp']}",
                "FERRULE__MESSAGING__LISTEN_TLS": "127.0.0.1:0",
                "FERRULE__ADAPTERS__HTTP__LISTEN": f"127.0.0.1:{p['http']}",
                "FERRULE__ADAPTERS__HTTP__LISTEN_TLS": "127.0.0.1:0",
                "FERRULE__ADAPTERS__MQTT__LISTEN": f"127.0.0.1:{p['mqtt']}",
                "FERRULE__ADAPTERS__MQTT__LISTEN_TLS": "127.0.0.1:0",
                "FERRULE__ADAPTERS__COAP__LISTEN": "127.0.0.1:0",
                "FERRULE__ADAPTERS__COAP__LISTEN_DTLS": f"127.0.0.1:{p['coaps']}",
                "FERRULE__REGISTRY__LISTEN": f"127.0.0.1:{p['registry']}",
            })
            log = open(data / "ferrule.log", "wb")
            logs.append(log)
            proc = subprocess.Popen([str(BIN), "serve", "--config", str(mounted_config(s))],
                                    stdout=log, stderr=subprocess.STDOUT, env=run_env)
            instances.append((name, proc, data))
        for name, proc, data in instances:
            deadline = time.time() + 60
            while not (data / "listeners.json").exists():
                assert proc.poll() is None, f"{name} exited: {(data / 'ferrule.log').read_text()}"
                assert time.time() < deadline, f"{name} did not start: {(data / 'ferrule.log').read_text()}"
                time.sleep(0.1)

        # The compose healthcheck command, pointed at each instance's ops port.
        health = services["ferrule-1"]["healthcheck"]["test"]
        assert health[0] == "CMD"
        for name in FERRULE_SERVICES:
            cmd = [a.replace("/dev/tcp/127.0.0.1/8088", f"/dev/tcp/127.0.0.1/{ports[name]['ops']}") for a in health[1:]]
            assert subprocess.run(cmd, timeout=10).returncode == 0, name

        smoke_env = {**os.environ, "FERRULE": str(BIN)}
        for var, key in [("OPS_PORTS", "ops"), ("HTTP_PORTS", "http"), ("AMQP_PORTS", "amqp"), ("REGISTRY_PORTS", "registry")]:
            smoke_env[var] = " ".join(str(ports[n][key]) for n in FERRULE_SERVICES)
        smoke = subprocess.run([str(DEPLOY / "compose" / "smoke.sh")], capture_output=True, text=True,
                               timeout=180, env=smoke_env)
        print(smoke.stdout)
        assert smoke.returncode == 0, smoke.stdout + smoke.stderr + "".join(
            (d / "ferrule.log").read_text(errors="replace")[-1500:] for _, _, d in instances)
        assert smoke.stdout.rstrip().endswith("== OK")

        # The event queue is a quorum queue at RabbitMQ.
        queues = rabbit_api("GET", "/api/queues/%2F", user=user, password=password)
        events = [q for q in queues if q["name"].startswith("event.smoke-")]
        assert events and all(q["type"] == "quorum" for q in events), queues

        # Scale down by one: SIGTERM, drained well within compose's stop_grace_period.
        name, proc, _ = instances[0]
        started = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        drained = time.time() - started
        print(f"{name}: exited {drained:.1f} s after SIGTERM")
        grace = services[name]["stop_grace_period"]
        assert drained < int(grace.rstrip("s"))
    finally:
        for _, proc, _ in instances:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc, _ in instances:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()
        brokers("rabbit-stop", "1")
        brokers("redis-stop", "3")
