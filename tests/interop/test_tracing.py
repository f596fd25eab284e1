"""Distributed tracing (issue 12): with an OTLP/HTTP receiver configured (here an in-test
HTTP server standing in for a collector), a device upload over MQTT (mosquitto_pub)
reaches a python-qpid-proton application with a W3C `traceparent`, the upload's span is
exported with that trace id (with a child span for its registry look-up), and a command
the application sends in the same trace is exported as a child span; tenants'
`tracing.sampling-mode` decides sampling."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from proton import Message

from amqp_client import Collector, connect
from registry_client import Registry
from test_adapters import mqtt_port, run
from test_commands import MqttDevice


class Receiver:
    """An OTLP/HTTP JSON receiver: keeps every span POSTed to /v1/traces."""

    def __init__(self):
        self.spans = []
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.path == "/v1/traces":
                    doc = json.loads(body)
                    for rs in doc["resourceSpans"]:
                        for ss in rs["scopeSpans"]:
                            spans.extend(ss["spans"])
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait_for(self, pred, timeout=5):
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = [s for s in list(self.spans) if pred(s)]
            if found:
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"no such span in {len(self.spans)}: {self.spans[-3:]}")

    def close(self):
        self.server.shutdown()


def attrs(span):
    return {a["key"]: a["value"].get("stringValue") for a in span["attributes"]}


def test_upload_to_application_to_command_in_one_trace(platform_factory, monkeypatch):
    receiver = Receiver()
    monkeypatch.setenv("FERRULE__TRACING__OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("FERRULE__TRACING__SAMPLE_RATIO", "0.0")
    p = platform_factory().start()
    try:
        reg = Registry(p.registry_url, p.registry_token)
        reg.call("POST", "/v1/tenants/t1", {"tracing": {"sampling-mode": "all"}})
        reg.device("t1", "d1", password="pw")
        reg.tenant("t2").device("t2", "e1", password="pw")
        telemetry = Collector(p.url("t1"), "telemetry/t1", name="traced-app")
        telemetry.start()
        res = run(["mosquitto_pub", "-h", "127.0.0.1", "-p", mqtt_port(p), "-u", "d1@t1", "-P", "pw",
                   "-q", "1", "-t", "telemetry", "-m", "traced"])
        assert res.returncode == 0, res
        msg = telemetry.next(timeout=10)
        telemetry.close()
        version, trace_id, parent_span, flags = msg.properties["traceparent"].split("-")
        assert version == "00" and flags == "01", msg.properties
        upload = receiver.wait_for(lambda s: s["traceId"] == trace_id and s["name"] != "registry look-up")
        assert upload["name"] == "upload telemetry" and upload["spanId"] == parent_span, upload
        assert attrs(upload)["tenant_id"] == "t1" and attrs(upload)["device_id"] == "d1", upload
        lookup = receiver.wait_for(lambda s: s["name"] == "registry look-up" and s["traceId"] == trace_id)
        assert lookup["parentSpanId"] == upload["spanId"], lookup
        assert int(lookup["startTimeUnixNano"]) >= int(upload["startTimeUnixNano"]), (lookup, upload)

        # The application continues the trace with a command.
        device = MqttDevice(p, "d1@t1", "pw", "command///req/#", answer=False)
        app_span = "1122334455667788"
        conn = connect(p.url("t1"))
        conn.create_sender("command/t1", name="traced-commands").send(Message(
            address="command/t1/d1", subject="reboot", body="now",
            properties={"traceparent": f"00-{trace_id}-{app_span}-01"}))
        conn.close()
        command = receiver.wait_for(lambda s: s["name"] == "command" and s["traceId"] == trace_id)
        assert command["parentSpanId"] == app_span and attrs(command)["command"] == "reboot", command
        device.close()

        # Tenant t2 has the default sampling (ratio 0 here): context propagated, not sampled.
        events = Collector(p.url("t2"), "event/t2", name="untraced")
        events.start()
        res = run(["mosquitto_pub", "-h", "127.0.0.1", "-p", mqtt_port(p), "-u", "e1@t2", "-P", "pw",
                   "-q", "1", "-t", "event", "-m", "not traced"])
        assert res.returncode == 0, res
        msgs = []
        deadline = time.time() + 10
        while not msgs and time.time() < deadline:
            msgs = [m for m in events.messages if bytes(m.body) == b"not traced"]
            time.sleep(0.05)
        events.close()
        _, t2_trace, _, t2_flags = msgs[0].properties["traceparent"].split("-")
        assert t2_flags == "00"
        time.sleep(1.5)
        assert not [s for s in receiver.spans if s["traceId"] == t2_trace], "an unsampled trace was exported"
    finally:
        receiver.close()
