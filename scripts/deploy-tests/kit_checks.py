"""Checks of the kit's files that no generic validator knows (scripts/lint-deploy.sh runs them).

    python3 kit_checks.py REPO COMPOSE_JSON K8S_BASE_YAML K8S_MULTI_GPU_YAML

COMPOSE_JSON is `docker-compose config --format json` of deploy/compose/compose.yaml; the two
YAML files are `kubectl kustomize` of deploy/k8s and deploy/k8s-multi-gpu (so these checks see
what would be applied, not the source).

 - .dockerignore: with Docker's matching rules (patterns anchored at the context root, `**` any
   number of folders, `!` re-includes, the last match wins, a matched folder excludes all under
   it), every file git tracks is sent to the build and no build output or secret is;
 - the stop budget: each supervisor (systemd units, compose, Kubernetes, Slurm, bootstrap.sh)
   sets the worker's stop grace (--stop-grace / ABLATE_STOP_GRACE) explicitly and waits at
   least that grace + 10 s before it kills a worker, so a worker that checkpoints is never
   killed mid-upload;
 - multi-GPU trials: compose's worker container and the k8s-multi-gpu pods hold several GPUs and
   run `ablate-worker --all-gpus` (a gang forms among the workers of one host);
 - logs are bounded (compose log driver options); CUDA images are tagged with their architecture;
 - health and metrics: --metrics-listen in compose (with healthchecks on /ready and /metrics that
   the image can run), the systemd units and env example, and k8s (a metrics containerPort,
   prometheus.io scrape annotations, the workers' readinessProbe /ready and livenessProbe /healthz).
Prints one line per problem and exits 1 if any.
"""

import json
import os
import re
import subprocess
import sys

import yaml

REPO, COMPOSE_JSON, K8S_BASE, K8S_GANG = sys.argv[1:5]
problems = []


def problem(msg):
    print("FAIL:", msg)
    problems.append(msg)


def read(rel):
    with open(os.path.join(REPO, rel)) as f:
        return f.read()


# --- .dockerignore ------------------------------------------------------------------------------
def docker_patterns(text):
    pats = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        if neg:
            line = line[1:].strip()
        line = os.path.normpath(line).lstrip("/")
        rx = ""
        i = 0
        while i < len(line):
            if line.startswith("**/", i):
                rx += "(?:.*/)?"
                i += 3
            elif line.startswith("**", i):
                rx += ".*"
                i += 2
            elif line[i] == "*":
                rx += "[^/]*"
                i += 1
            elif line[i] == "?":
                rx += "[^/]"
                i += 1
            else:
                rx += re.escape(line[i])
                i += 1
        pats.append((re.compile("^" + rx + "$"), neg))
    return pats


def docker_excluded(path, pats):
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for rx, neg in pats:
        if any(rx.match(p) for p in prefixes):
            excluded = not neg
    return excluded


pats = docker_patterns(read(".dockerignore"))
tracked = subprocess.run(["git", "-C", REPO, "ls-files"], capture_output=True, text=True,
                         check=True).stdout.split()
sent_wrongly = [p for p in tracked if docker_excluded(p, pats)]
if sent_wrongly:
    problem(f".dockerignore excludes tracked files the image builds may need: {sent_wrongly[:5]}")
must_not_send = [
    "target/debug/ablate", "target/cuda/release/ablate-worker", "worker/target/x",
    "secrets/ca.key", "secrets/server.key", "secrets/worker.token", "secrets/admin.token",
    "secrets/ca.pem", "secrets/server.pem",
    "deploy/compose/secrets/worker.token", "deploy/compose/secrets/server.key",
    "deploy/compose/secrets/ca.pem", ".git/config", "some/where/else/server.key",
]
for p in must_not_send:
    if not docker_excluded(p, pats):
        problem(f".dockerignore lets {p} into the image build context")
# And git keeps the secrets out of commits.
for p in ("secrets/ca.key", "secrets/worker.token", "deploy/compose/secrets/admin.token"):
    if subprocess.run(["git", "-C", REPO, "check-ignore", "-q", p]).returncode != 0:
        problem(f".gitignore does not ignore {p}")

# --- the stop budget ----------------------------------------------------------------------------
def seconds(v):
    """90, "90s", "1m30s", "90" -> 90."""
    if isinstance(v, int):
        return v
    total, num = 0, ""
    for c in str(v):
        if c.isdigit():
            num += c
        else:
            total += int(num or 0) * {"h": 3600, "m": 60, "s": 1}[c]
            num = ""
    return total + int(num or 0)


def grace_in_args(args):
    """--stop-grace=60s or --stop-grace 60s in an argv list -> seconds, else None."""
    for i, a in enumerate(args):
        if a.startswith("--stop-grace="):
            return seconds(a.split("=", 1)[1])
        if a == "--stop-grace" and i + 1 < len(args):
            return seconds(args[i + 1])
    return None


# (what, the supervisor's budget in s, the worker's stop grace in s or None when not set)
budgets = []
unit = read("deploy/systemd/ablate-worker@.service")
m = re.search(r"^TimeoutStopSec=(\S+)", unit, re.M)
g = re.search(r"^Environment=ABLATE_STOP_GRACE=(\S+)", unit, re.M)
if not re.search(r"^RestartPreventExitStatus=.*\b78\b", unit, re.M):
    problem("systemd ablate-worker@.service: no RestartPreventExitStatus=78 (a worker refused for "
            "version skew would be restarted forever)")
budgets.append(("systemd ablate-worker@.service TimeoutStopSec", seconds(m.group(1)) if m else 0,
                seconds(g.group(1)) if g else None))
compose = json.load(open(COMPOSE_JSON))
for name, svc in compose["services"].items():
    cmd = svc.get("command") or []
    if "ablate-worker" in " ".join(cmd):
        env = svc.get("environment") or {}
        g = grace_in_args(cmd)
        if g is None and env.get("ABLATE_STOP_GRACE"):
            g = seconds(env["ABLATE_STOP_GRACE"])
        budgets.append((f"compose {name} stop_grace_period",
                        seconds(svc.get("stop_grace_period", "10s")), g))
for path in (K8S_BASE, K8S_GANG):
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc.get("kind") in ("Deployment", "StatefulSet"):
            spec = doc["spec"]["template"]["spec"]
            for c in spec["containers"]:
                if "ablate-worker" in (c.get("args") or []):
                    budgets.append((
                        f"k8s {os.path.basename(path)} {doc['metadata']['name']} terminationGracePeriodSeconds",
                        spec.get("terminationGracePeriodSeconds", 30), grace_in_args(c["args"])))
sbatch = read("deploy/slurm/ablate-worker.sbatch")
g = re.search(r'^export ABLATE_STOP_GRACE="\$\{ABLATE_STOP_GRACE:-(\w+)\}"', sbatch, re.M)
g = seconds(g.group(1)) if g else None
m = re.search(r"^#SBATCH --signal=B:\w+@(\d+)", sbatch, re.M)
budgets.append(("slurm --signal warning", int(m.group(1)) if m else 0, g))
# scancel / preemption: Slurm's default KillWait.
budgets.append(("slurm KillWait (default)", 30, g))
boot = read("deploy/bootstrap.sh")
m = re.search(r"for _ in \$\(seq 1 (\d+)\); do\n\s+kill -0 \"\$old\"", boot)
g = re.search(r"--stop-grace (\d+[hms]?)\b", boot)
budgets.append(("bootstrap.sh stop wait", int(m.group(1)) if m else 0, seconds(g.group(1)) if g else None))
for what, secs, grace in budgets:
    if grace is None:
        problem(f"{what}: the worker's stop grace is not set there (--stop-grace / ABLATE_STOP_GRACE)")
    elif secs < grace + 10:
        problem(f"{what} = {secs} s: less than the worker's stop grace ({grace} s) + 10 s")
print("kit_checks: stop budgets: " + ", ".join(f"{w} {s} s (grace {g} s)" for w, s, g in budgets))

# --- multi-GPU forms ----------------------------------------------------------------------------
w = compose["services"].get("workers")
if not w:
    problem("compose: no `workers` service")
else:
    cmd = w.get("command") or []
    devs = (w.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices") or [])
    if "--all-gpus" not in cmd or any(a.startswith("--device") for a in cmd):
        problem(f"compose workers: want `ablate-worker --all-gpus`, got {cmd}")
    if not devs or not (devs[0].get("count") in ("all", -1) or len(devs[0].get("device_ids") or []) > 1):
        problem(f"compose workers: the container must hold several GPUs, got {devs}")
    opts = (w.get("logging") or {}).get("options") or {}
    if not opts.get("max-size") or not opts.get("max-file"):
        problem(f"compose workers: unbounded logs ({w.get('logging')})")
    if not re.search(r"-cuda\d+\.\d+-sm\d+$", w.get("image", "")):
        problem(f"compose workers: image {w.get('image')} does not name its CUDA release and architecture")
if not ((compose["services"].get("coordinator") or {}).get("logging") or {}).get("options", {}).get("max-size"):
    problem("compose coordinator: unbounded logs")

for path, want_many in ((K8S_BASE, False), (K8S_GANG, True)):
    for doc in yaml.safe_load_all(open(path)):
        if not doc or doc.get("kind") != "Deployment" or doc["metadata"]["name"] != "ablate-worker":
            continue
        c = doc["spec"]["template"]["spec"]["containers"][0]
        gpus = int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        args = c.get("args") or []
        if want_many and (gpus < 2 or "--all-gpus" not in args or any(a.startswith("--device") for a in args)):
            problem(f"k8s-multi-gpu: want a pod with several GPUs running --all-gpus, got {gpus} GPUs, {args}")
        if not want_many and (gpus != 1 or "--device=cuda:0" not in args):
            problem(f"k8s: want one GPU per pod with --device=cuda:0, got {gpus}, {args}")
        if not re.search(r"-cuda\d+\.\d+-sm\d+$", c["image"]):
            problem(f"k8s {os.path.basename(path)}: image {c['image']} does not name its CUDA release and architecture")

# --- health and metrics ---------------------------------------------------------------------------
def listen_port(args, env=None):
    """The port of --metrics-listen=HOST:PORT (or ABLATE_METRICS_LISTEN in env), else None."""
    v = None
    for i, a in enumerate(args):
        if a.startswith("--metrics-listen="):
            v = a.split("=", 1)[1]
        elif a == "--metrics-listen" and i + 1 < len(args):
            v = args[i + 1]
    if v is None and env:
        v = env.get("ABLATE_METRICS_LISTEN")
    return int(v.rsplit(":", 1)[1]) if v and v.rsplit(":", 1)[-1].isdigit() else None


for name, path in (("workers", "/ready"), ("coordinator", "/metrics")):
    svc = compose["services"].get(name) or {}
    port = listen_port(svc.get("command") or [], svc.get("environment") or {})
    test = " ".join((svc.get("healthcheck") or {}).get("test") or [])
    if port is None:
        problem(f"compose {name}: no --metrics-listen / ABLATE_METRICS_LISTEN")
    elif f":{port}{path}" not in test:
        problem(f"compose {name}: want a healthcheck on :{port}{path}, got {test!r}")
    elif "python3" in test and "python3" not in read(
            "deploy/docker/Dockerfile.cpu" if name == "coordinator" else "deploy/docker/Dockerfile.cuda"):
        problem(f"compose {name}: the healthcheck runs python3, which the image lacks")

env_example = read("deploy/systemd/worker.env.example")
if not re.search(r"^ABLATE_METRICS_LISTEN=\S+:\d+$", env_example, re.M):
    problem("systemd worker.env.example: no ABLATE_METRICS_LISTEN=HOST:PORT")
if "ABLATE_METRICS_LISTEN" not in unit:
    problem("systemd ablate-worker@.service: ABLATE_METRICS_LISTEN is not used (each instance needs its own port)")
if "--metrics-listen" not in read("deploy/systemd/ablate-coordinator.service"):
    problem("systemd ablate-coordinator.service: no --metrics-listen")

for path in (K8S_BASE, K8S_GANG):
    where = os.path.basename(path)
    for doc in yaml.safe_load_all(open(path)):
        if not doc or doc.get("kind") not in ("Deployment", "StatefulSet"):
            continue
        tmpl = doc["spec"]["template"]
        c = tmpl["spec"]["containers"][0]
        what = f"k8s {where} {doc['metadata']['name']}"
        port = listen_port(c.get("args") or [])
        if port is None:
            problem(f"{what}: no --metrics-listen")
            continue
        ann = tmpl.get("metadata", {}).get("annotations") or {}
        if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(port):
            problem(f"{what}: pods lack prometheus.io/scrape \"true\" and prometheus.io/port \"{port}\": {ann}")
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
        if ports.get("metrics") != port:
            problem(f"{what}: no containerPort {port} named metrics: {ports}")
        if "ablate-worker" in (c.get("args") or []):
            for probe, want in (("readinessProbe", "/ready"), ("livenessProbe", "/healthz")):
                get = (c.get(probe) or {}).get("httpGet") or {}
                if get.get("path") != want or get.get("port") not in ("metrics", port):
                    problem(f"{what}: want {probe} httpGet {want} on the metrics port, got {c.get(probe)}")

print(f"kit_checks: {len(problems)} problem(s)")
sys.exit(1 if problems else 0)
