"""Provisioning through the management API (Hono's Device Registry Management API v1)."""
import base64
import json
import urllib.error
import urllib.request


class Registry:
    def __init__(self, base_url, token):
        self.base = base_url.rstrip("/")
        self.token = token

    def call(self, method, path, body=None, expect=(200, 201, 204)):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status, text = resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        if expect and status not in expect:
            raise AssertionError(f"{method} {path} -> {status}: {text}")
        return status, (json.loads(text) if text.strip().startswith(("{", "[")) else text)

    def tenant(self, tenant, unauthenticated=False, enabled=True):
        body = {"enabled": enabled}
        if unauthenticated:
            body["adapters"] = [
                {"type": t, "enabled": True, "device-authentication-required": False}
                for t in ("hono-http", "hono-mqtt", "hono-coap")
            ]
        self.call("POST", f"/v1/tenants/{tenant}", body)
        return self

    def device(self, tenant, device, password=None, psk=None, via=None, enabled=True):
        body = {"enabled": enabled}
        if via:
            body["via"] = via
        self.call("POST", f"/v1/devices/{tenant}/{device}", body)
        creds = []
        if password:
            creds.append({"type": "hashed-password", "auth-id": device, "secrets": [{"pwd-plain": password}]})
        if psk:
            creds.append({"type": "psk", "auth-id": device, "secrets": [{"key": base64.b64encode(psk.encode()).decode()}]})
        if creds:
            self.call("PUT", f"/v1/credentials/{tenant}/{device}", creds)
        return self

    def set_device_enabled(self, tenant, device, enabled):
        status, body = self.call("GET", f"/v1/devices/{tenant}/{device}")
        body["enabled"] = enabled
        self.call("PUT", f"/v1/devices/{tenant}/{device}", body)
