"""Run the systemd units' command lines as systemd would expand them, without systemd.

    python3 unit_exec.py REPO WORKDIR

`systemd-analyze verify` (scripts/lint-deploy.sh) checks the units' syntax; this checks what the
shell command lines in them do: the units' Environment= settings, the specifiers %i, %H, %% and
`$$` expanded as systemd does, run with /bin/sh, with the binaries they start replaced by a
recorder of their arguments. It covers the credential fallback for systemd < 247 (no
$CREDENTIALS_DIRECTORY), the CPU instance, a bad instance name and the NVIDIA device-node
command. Prints one line per failed expectation; exits 1 if any.
"""

import os
import re
import shlex
import socket
import stat
import subprocess
import sys

REPO, WORK = sys.argv[1], sys.argv[2]
HOST = socket.gethostname()
failures = []


def fail(msg):
    print("FAIL:", msg)
    failures.append(msg)


def unit_settings(path):
    """[(key, value)] of the [Service] section, continuation lines joined."""
    out, section, buf = [], None, ""
    with open(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if buf:
                line = buf + " " + line.lstrip()
                buf = ""
            if line.endswith("\\"):
                buf = line[:-1].rstrip()
                continue
            s = line.strip()
            if not s or s[0] in "#;":
                continue
            if s.startswith("["):
                section = s
                continue
            if section == "[Service]" and "=" in s:
                k, v = s.split("=", 1)
                out.append((k, v))
    return out


def expand(word, instance):
    """systemd's specifiers and $$ (the forms these units use)."""
    def spec(m):
        c = m.group(1)
        if c not in "iH%":
            # %d (the credentials folder) needs systemd 248: RHEL 8 (239) and Ubuntu 20.04 (245)
            # refuse the whole command line.
            fail(f"specifier %{c} in {word!r}: the units keep to %i, %H and %% (systemd 239+)")
            return ""
        return {"i": instance, "H": HOST, "%": "%"}[c]
    word = re.sub(r"%(.)", spec, word)
    return word.replace("$$", "$")


def commands(path, key, instance):
    """The argv lists of KEY= lines (prefixes + - ! @ stripped), and the unit's environment."""
    env, cmds = {}, []
    for k, v in unit_settings(path):
        if k == "Environment":
            for assignment in shlex.split(v):
                name, val = assignment.split("=", 1)
                env[name] = expand(val, instance)
        elif k == key:
            v = v.lstrip("+-!@")
            cmds.append([expand(w, instance) for w in shlex.split(v)])
    if len(cmds) != 1:
        fail(f"{os.path.basename(path)}: {len(cmds)} {key}= lines, want one")
        cmds = [["/bin/false"]]
    return cmds, env


def recorder(path, log):
    with open(path, "w") as f:
        f.write("#!/bin/sh\n"
                f"{{ printf '%s\\n' \"$(basename \"$0\")\"; for a in \"$@\"; do printf '%s\\n' \"$a\"; done;"
                f" printf 'CUDA_VISIBLE_DEVICES=%s\\n' \"${{CUDA_VISIBLE_DEVICES-<unset>}}\"; echo --; }} >>{log}\n")
    os.chmod(path, 0o755)


def run(argv, env, replace):
    argv = [a for a in argv]
    for old, new in replace.items():
        argv = [a.replace(old, new) for a in argv]
    full = {"PATH": env.get("PATH", "/usr/bin:/bin")}
    full.update(env)
    return subprocess.run(argv, env=full, capture_output=True, text=True, timeout=30)


def records(log):
    if not os.path.exists(log):
        return []
    with open(log) as f:
        text = f.read()
    os.remove(log)
    return [r.strip("\n").split("\n") for r in text.split("--\n") if r.strip()]


bindir = os.path.join(WORK, "unit-bin")
os.makedirs(bindir, exist_ok=True)
log = os.path.join(WORK, "unit-exec.log")
for name in ("ablate", "ablate-worker", "nvidia-modprobe"):
    recorder(os.path.join(bindir, name), log)
replace = {"/usr/local/bin/": bindir + "/"}

worker_unit = os.path.join(REPO, "deploy/systemd/ablate-worker@.service")
coord_unit = os.path.join(REPO, "deploy/systemd/ablate-coordinator.service")

# --- ExecStart of ablate-worker@N, with and without credentials.
for inst, cred, want_tok in (("0", "/run/credentials/ablate-worker@0.service", None),
                             ("3", None, "/etc/ablate/worker.token")):
    (argv,), env = commands(worker_unit, "ExecStart", inst)
    if cred:
        env["CREDENTIALS_DIRECTORY"] = cred
        want_tok = cred + "/worker.token"
    r = run(argv, env, replace)
    got = records(log)
    want = ["ablate-worker", "--device", "cuda:0", "--name", f"{HOST}-gpu{inst}", "--token-file",
            want_tok, "--cache", "/var/cache/ablate", "--work-dir", f"/var/lib/ablate-worker/{inst}",
            f"CUDA_VISIBLE_DEVICES={inst}"]
    if r.returncode != 0 or got != [want]:
        fail(f"ablate-worker@{inst} (credentials {cred}): exit {r.returncode} {r.stderr.strip()}; ran {got}, want {want}")

# --- ABLATE_METRICS_LISTEN (worker.env): ablate-worker@N serves on PORT+N, @cpu on PORT, 0 stays 0.
for inst, listen, want_listen in (("3", "0.0.0.0:9465", "0.0.0.0:9468"),
                                  ("cpu", "[::]:9465", "[::]:9465"),
                                  ("2", "127.0.0.1:0", "127.0.0.1:0")):
    (argv,), env = commands(worker_unit, "ExecStart", inst)
    env["ABLATE_METRICS_LISTEN"] = listen
    r = run(argv, env, replace)
    got = records(log)
    if r.returncode != 0 or len(got) != 1 or got[0][-3:-1] != ["--metrics-listen", want_listen]:
        fail(f"ablate-worker@{inst} with ABLATE_METRICS_LISTEN={listen}: exit {r.returncode} "
             f"{r.stderr.strip()}; ran {got}, want --metrics-listen {want_listen} last")

(argv,), env = commands(worker_unit, "ExecStart", "cpu")
r = run(argv, env, replace)
got = records(log)
want = ["ablate-worker", "--device", "cpu", "--name", f"{HOST}-cpu", "--token-file",
        "/etc/ablate/worker.token", "--cache", "/var/cache/ablate", "--work-dir",
        "/var/lib/ablate-worker/cpu", "CUDA_VISIBLE_DEVICES=<unset>"]
if r.returncode != 0 or got != [want]:
    fail(f"ablate-worker@cpu: exit {r.returncode}; ran {got}, want {want}")

(argv,), env = commands(worker_unit, "ExecStart", "gpu1")
r = run(argv, env, replace)
if r.returncode != 2 or "the instance must be a GPU index or cpu" not in r.stderr or records(log):
    fail(f"ablate-worker@gpu1: want exit 2 and a message, got {r.returncode} {r.stderr!r}")

# --- ExecStartPre: the NVIDIA device nodes, one per GPU minor, plus nvidia-uvm.
gpus = os.path.join(WORK, "proc-nvidia-gpus")
for bus, minor in (("0000:18:00.0", 0), ("0000:9a:00.0", 3)):
    os.makedirs(os.path.join(gpus, bus), exist_ok=True)
    with open(os.path.join(gpus, bus, "information"), "w") as f:
        f.write(f"Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 0\nDevice Minor: \t {minor}\n")
pre_replace = {"/proc/driver/nvidia/gpus": gpus}
for inst, path, want in (("1", bindir + ":/usr/bin:/bin",
                          [["nvidia-modprobe", "-c0", "-u", "CUDA_VISIBLE_DEVICES=1"],
                           ["nvidia-modprobe", "-c0", "CUDA_VISIBLE_DEVICES=1"],
                           ["nvidia-modprobe", "-c3", "CUDA_VISIBLE_DEVICES=1"]]),
                         ("cpu", bindir + ":/usr/bin:/bin", []),
                         ("1", "/usr/bin:/bin", [])):
    (argv,), env = commands(worker_unit, "ExecStartPre", inst)
    env["PATH"] = path
    r = run(argv, env, pre_replace)
    got = records(log)
    if r.returncode != 0 or got != want:
        fail(f"ExecStartPre of ablate-worker@{inst} (PATH {path}): exit {r.returncode} {r.stderr!r}; ran {got}, want {want}")

# --- the coordinator, with and without credentials.
for cred in ("/run/credentials/ablate-coordinator.service", None):
    (argv,), env = commands(coord_unit, "ExecStart", "")
    if cred:
        env["CREDENTIALS_DIRECTORY"] = cred
        files = [f"{cred}/worker.token", f"{cred}/admin.token", f"{cred}/tls.pem", f"{cred}/tls.key"]
    else:
        files = ["/etc/ablate/worker.token", "/etc/ablate/admin.token", "/etc/ablate/tls/server.pem",
                 "/etc/ablate/tls/server.key"]
    r = run(argv, env, replace)
    got = records(log)
    want = ["ablate", "serve", "--listen", "0.0.0.0:7070", "--state", "/var/lib/ablate",
            "--worker-token-file", files[0], "--admin-token-file", files[1], "--tls-cert", files[2],
            "--tls-key", files[3], "CUDA_VISIBLE_DEVICES=<unset>"]
    if r.returncode != 0 or got != [want]:
        fail(f"ablate-coordinator (credentials {cred}): exit {r.returncode} {r.stderr!r}; ran {got}, want {want}")

(argv,), env = commands(coord_unit, "ExecStart", "")
env["ABLATE_METRICS_LISTEN"] = "0.0.0.0:9464"
r = run(argv, env, replace)
got = records(log)
if r.returncode != 0 or len(got) != 1 or got[0][-3:-1] != ["--metrics-listen", "0.0.0.0:9464"]:
    fail(f"ablate-coordinator with ABLATE_METRICS_LISTEN: exit {r.returncode} {r.stderr!r}; ran {got}")

# Credentials the units load must be the files the fallback reads.
for unit, key_files in ((worker_unit, {"worker.token": "/etc/ablate/worker.token"}),
                        (coord_unit, {"worker.token": "/etc/ablate/worker.token",
                                      "admin.token": "/etc/ablate/admin.token",
                                      "tls.pem": "/etc/ablate/tls/server.pem",
                                      "tls.key": "/etc/ablate/tls/server.key"})):
    loaded = dict(v.split(":", 1) for k, v in unit_settings(unit) if k == "LoadCredential")
    if loaded != key_files:
        fail(f"{os.path.basename(unit)}: LoadCredential= {loaded} differs from the fallback files {key_files}")

print(f"unit_exec: {len(failures)} problem(s)")
sys.exit(1 if failures else 0)
