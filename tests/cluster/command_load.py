#!/usr/bin/env python3
"""Commands at scale across instances (issue 15, must-show 2), a script rather than a CI
test (about a minute on 2 cores): 1,000 MQTT devices spread over 3 cluster-mode instances
(two tenants of 500, ferrule-loadgen's devices answering every request), and 10,000
request/response commands from two applications attached to different instances
(5,000 each, 32 in flight). Prints each application's result and checks that every
command was answered, none is missing and no device answered more requests than were
sent (a command delivered twice would be answered twice).

    python3 tests/cluster/command_load.py [--devices 500] [--count 5000] [--release]

Uses RabbitMQ and Redis Cluster on the private ports of tests/cluster (do not run it
beside `pytest tests/cluster`), and target/{debug,release}/ferrule and ferrule-loadgen.
"""
import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "interop"))
sys.path.insert(0, str(HERE))  # first: tests/cluster's conftest, not tests/interop's

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--devices", type=int, default=500, help="devices per tenant (two tenants)")
parser.add_argument("--count", type=int, default=5000, help="commands per application")
parser.add_argument("--release", action="store_true", help="use target/release binaries")
args = parser.parse_args()
profile = "release" if args.release else "debug"
os.environ.setdefault("FERRULE_BIN", str(ROOT / "target" / profile / "ferrule"))
LOADGEN = ROOT / "target" / profile / "ferrule-loadgen"

import conftest  # noqa: E402  (after FERRULE_BIN is set)
from registry_client import Registry  # noqa: E402

def main():
    base = Path(tempfile.mkdtemp(prefix="ferrule-cmdload-"))
    os.environ["FERRULE_CLUSTER_BASE"] = str(base)
    instances = []
    try:
        conftest.brokers_command("redis-start", "3", "0")
        conftest.brokers_command("rabbit-start", "1")
        backend = conftest.RABBIT_BACKEND.format(amqp=conftest.RABBIT_AMQP, http=conftest.RABBIT_HTTP)
        for k in range(3):
            inst = conftest.Instance(base / f"i{k + 1}", f"i{k + 1}", backend, "ferrule-cmdload")
            # the registry's per-source connection rate: provisioning opens many connections
            text = inst.config_path.read_text().replace(
                '[registry]\n', '[registry]\nconnection_rate_per_ip = 100000.0\nconnection_burst_per_ip = 100000\n', 1)
            # ...and the MQTT per-source limits: every device connects from 127.0.0.1
            text = text.replace("[adapters.mqtt]\n", "[adapters.mqtt]\nmax_connections_per_ip = 100000\n"
                                "connection_rate_per_ip = 100000.0\nconnection_burst_per_ip = 100000\n", 1)
            inst.config_path.write_text(text)
            instances.append(inst.start())
        i1, i2, i3 = instances
        tenants = ["cmda", "cmdb"]
        reg = Registry(i1.registry_url, conftest.TOKEN)
        started = time.time()
        for t in tenants:
            reg.tenant(t)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda job: reg.device(job[0], f"dev{job[1]}", password="pw"),
                          [(t, i) for t in tenants for i in range(args.devices)]))
        print(f"provisioned {len(tenants) * args.devices} devices in {time.time() - started:.1f} s", flush=True)
        hosts = ",".join(i.listeners["mqtt"] for i in instances)
        apps = {"cmda": i1, "cmdb": i2}  # two applications on different instances
        procs = {}
        for t, app in apps.items():
            cmd = [str(LOADGEN), "commands", "--host", hosts, "--username", f"dev{{i}}@{t}", "--password", "pw",
                   "--devices", str(args.devices), "--device-count", str(args.devices), "--client-id", f"{t}-{{i}}",
                   "--tenant", t, "--amqp", app.listeners["amqp"], "--amqp-user", f"app@{t}",
                   "--amqp-password", conftest.APP_PASSWORD, "--count", str(args.count), "--window", "32",
                   "--drain-timeout", "30"]
            procs[t] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ok = True
        for t, proc in procs.items():
            out, err = proc.communicate(timeout=900)
            lines = [l for l in out.splitlines() if l.startswith("{")]
            if proc.returncode != 0 or not lines:
                print(f"{t}: loadgen failed ({proc.returncode}): {err[-2000:]}")
                ok = False
                continue
            r = json.loads(lines[-1])
            answered_all = r.get("msgs") == r.get("sent") == args.count and r.get("missing") == 0 and r.get("errors") == 0
            no_duplicates = r.get("device_answers") == r.get("sent")
            print(f"{t} (application on {apps[t].name}, {args.devices} devices over i1..i3): "
                  f"sent {r.get('sent')}, answered {r.get('msgs')}, missing {r.get('missing')}, errors {r.get('errors')}, "
                  f"device answers {r.get('device_answers')}, {r.get('msgs_per_s')} commands/s, p50 {r.get('p50_ms')} ms, "
                  f"p99 {r.get('p99_ms')} ms" + (f", first error {r['first_error']}" if r.get("first_error") else ""))
            ok = ok and answered_all and no_duplicates
        print("OK: every command answered, none missing, none delivered twice" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        for inst in instances:
            inst.stop()
        for stop in (("rabbit-stop", "1"), ("redis-stop", "3")):
            try:
                conftest.brokers_command(*stop)
            except Exception as e:  # keep stopping the rest
                print(f"{stop[0]}: {e}")


if __name__ == "__main__":
    sys.exit(main())
