"""deploy/ stays valid: Kubernetes manifests against the API schemas, compose as YAML."""
import subprocess
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


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
    res = subprocess.run([str(BIN), "config", "check", "--config", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_compose_file_parses():
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    assert compose["services"]["ferrule"]["build"]["dockerfile"] == "deploy/Dockerfile"
