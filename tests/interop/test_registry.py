"""The device registry inside `ferrule serve`: schemathesis against the live management
API, the operator CLI, and secrets kept out of responses and logs."""
import json
import subprocess
from pathlib import Path

from conftest import BIN
from registry_client import Registry

ROOT = Path(__file__).resolve().parents[2]


def test_schemathesis_default_checks_pass_against_the_live_api(platform):
    script = ROOT / "device-registry" / "tests" / "schemathesis.sh"
    res = subprocess.run(
        ["bash", str(script), platform.registry_url, platform.registry_token],
        capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]


def cli(platform, *args):
    return subprocess.run(
        [str(BIN), *args[:1], "--url", platform.registry_url, "--token", platform.registry_token, *args[1:]],
        capture_output=True, text=True, timeout=30,
    )


def test_operator_cli_manages_tenants_devices_credentials(platform):
    assert cli(platform, "tenant", "create", "cli-tenant").returncode == 0
    res = cli(platform, "device", "create", "cli-tenant", "sensor-1", "--data", '{"enabled": true}')
    assert res.returncode == 0, res.stderr
    creds = json.dumps([{"type": "hashed-password", "auth-id": "sensor-1", "secrets": [{"pwd-plain": "cli-pass-123"}]}])
    res = cli(platform, "credentials", "set", "cli-tenant", "sensor-1", "--data", creds)
    assert res.returncode == 0, res.stderr
    res = cli(platform, "credentials", "get", "cli-tenant", "sensor-1")
    assert res.returncode == 0 and "sensor-1" in res.stdout, res.stderr
    assert "cli-pass-123" not in res.stdout
    res = cli(platform, "device", "get", "cli-tenant", "nope")
    assert res.returncode != 0 and "404" in (res.stderr + res.stdout)
    wrong = subprocess.run(
        [str(BIN), "tenant", "--url", platform.registry_url, "--token", "wrong-token-0123456789", "get", "cli-tenant"],
        capture_output=True, text=True, timeout=30,
    )
    assert wrong.returncode != 0 and "401" in (wrong.stderr + wrong.stdout)


def test_passwords_never_leave_the_registry(platform):
    reg = Registry(platform.registry_url, platform.registry_token)
    reg.tenant("sec")
    reg.device("sec", "d1", password="very-secret-password-42")
    _, body = reg.call("GET", "/v1/credentials/sec/d1")
    text = json.dumps(body)
    assert "very-secret-password-42" not in text
    assert "pwd-hash" not in text and "$argon2" not in text
    assert "very-secret-password-42" not in platform.log_text()
