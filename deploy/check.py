#!/usr/bin/env python3
"""Cross-checks of deploy/ and a run of the real binary the way each deployment starts it.

Called by deploy/check.sh (with the virtualenv's Python, which has PyYAML):

    check.py consistency           the files agree with each other and with the code's defaults
    check.py run BINARY            starts BINARY as the image, the StatefulSet and the systemd
                                   unit would (addresses and paths moved to a temp dir and a
                                   loopback port), checks it is ready, that authorization is on,
                                   and that SIGTERM drains and exits 0 in time
    check.py nats NATS_SERVER      `nats-server -t` on every NATS config (deploy/nats/nats.conf
                                   for each compose node, the k8s ConfigMap's for each pod), then
                                   each config as a 3-node cluster on loopback: it forms, elects
                                   a JetStream meta leader, fsyncs always, and stops in time
    check.py run-jetstream BINARY NATS_SERVER
                                   the JetStream mode: the compose gateways and the k8s
                                   Deployment's gateways (two each) over a loopback cluster of
                                   their NATS config: ready, 401 without a token, a publish on
                                   one gateway read back from the other, an R3 file stream,
                                   SIGTERM exits 0 in time

Prints one line per check; exits 1 if any failed.
"""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
# Seconds a deployment's stop timeout must exceed shutdown_grace_secs by: the log's final
# flush and close come after the grace period.
FLUSH_MARGIN = 10
# The least LimitNOFILE / nofile for 100k connections plus the log's files.
MIN_NOFILE = 100_000 + 1024

failed = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failed.append(what)
    return ok


# ---------------------------------------------------------------- parsers


def dockerfile(path):
    """The stages of a Dockerfile: a list of (FROM line, [(INSTRUCTION, args)])."""
    text = path.read_text()
    lines, cur = [], ""
    for raw in text.splitlines():
        s = raw.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        lines.append(cur + s)
        cur = ""
    stages = []
    for line in lines:
        word, _, args = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            stages.append((args, []))
        elif stages:
            stages[-1][1].append((word, args.strip()))
    return stages


def instr(stage, word):
    return [a for w, a in stage[1] if w == word]


def exec_form(args):
    """The JSON array of an exec-form instruction."""
    return json.loads(args)


def flag(argv, name):
    """The value after `name` in argv (None when absent)."""
    for i, a in enumerate(argv[:-1]):
        if a == name:
            return argv[i + 1]
    return None


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def unit(path):
    """A systemd unit as {key: [values]} (sections merged; comments dropped)."""
    out = {}
    for raw in path.read_text().splitlines():
        s = raw.strip()
        if not s or s[0] in "#;[":
            continue
        k, _, v = s.partition("=")
        out.setdefault(k.strip(), []).append(v.strip())
    return out


def seconds(v):
    """A duration: 30, "30s", "1m30s", "2m" (systemd and compose spellings)."""
    if isinstance(v, (int, float)):
        return float(v)
    total, ok = 0.0, False
    for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|min|m|h|s)?", str(v)):
        ok = True
        total += float(n) * {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "": 1}[u]
    if not ok:
        raise ValueError(f"not a duration: {v!r}")
    return total


def sample_keys():
    """Every key deploy/tidewire.toml names, set or commented out (`# key = …`)."""
    keys = set(tomllib.loads((DEPLOY / "tidewire.toml").read_text()))
    for m in re.finditer(r"^#\s*([a-z_]+)\s*=", (DEPLOY / "tidewire.toml").read_text(), re.M):
        keys.add(m.group(1))
    return keys


def site_lines(text):
    """An nginx site without comments and blank lines."""
    out = []
    for raw in text.splitlines():
        s = raw.split("#", 1)[0].rstrip() if not raw.strip().startswith("#") else ""
        if s.strip():
            out.append(s)
    return out


# ---------------------------------------------------------------- the facts


class Facts:
    def __init__(self):
        stages = dockerfile(DEPLOY / "Dockerfile")
        self.stages = stages
        self.build = stages[0]
        self.final = stages[-1]
        self.entrypoint = exec_form(instr(self.final, "ENTRYPOINT")[-1])
        self.cmd = exec_form(instr(self.final, "CMD")[-1])
        user = instr(self.final, "USER")[-1]
        self.uid, _, gid = user.partition(":")
        self.uid, self.gid = int(self.uid), int(gid or self.uid)
        self.volumes = exec_form(instr(self.final, "VOLUME")[-1])
        self.expose = [int(p.split("/")[0]) for a in instr(self.final, "EXPOSE") for p in a.split()]
        self.stopsignal = (instr(self.final, "STOPSIGNAL") or ["SIGTERM"])[-1]
        hc = instr(self.final, "HEALTHCHECK")[-1]
        self.healthcheck = exec_form(hc.split(" CMD ", 1)[1])
        self.binary = self.entrypoint[0]
        self.port = port_of(flag(self.cmd, "--listen"))
        self.data_dir = flag(self.cmd, "--data-dir")

        self.compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())

        self.k8s = []
        for f in sorted((DEPLOY / "k8s").glob("*.yaml")):
            self.k8s += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]

        self.unit = unit(DEPLOY / "systemd" / "tidewire.service")
        self.sample = tomllib.loads((DEPLOY / "tidewire.toml").read_text())
        self.keys = sample_keys()

    def kind(self, kind):
        return [d for _, d in self.k8s if d.get("kind") == kind]

    def configmap_toml(self):
        cm = self.kind("ConfigMap")[0]
        return cm["data"]["tidewire.toml"]


# ---------------------------------------------------------------- consistency


def consistency():
    f = Facts()
    grace_default = f.sample["shutdown_grace_secs"]

    print("# Dockerfile")
    check(f.binary == "/usr/local/bin/tidewire", f"ENTRYPOINT is the binary: {f.binary}")
    check(f.cmd[0] == "serve", "CMD runs `serve`")
    check(f.uid != 0 and f.gid != 0, f"USER is not root: {f.uid}:{f.gid}")
    check(f.volumes == [f.data_dir], f"VOLUME {f.volumes} is the --data-dir {f.data_dir}")
    check(f.expose == [f.port], f"EXPOSE {f.expose} is the --listen port {f.port}")
    check(flag(f.cmd, "--listen").startswith("0.0.0.0:"), "listens on every interface of the container")
    check(f.stopsignal == "SIGTERM", f"STOPSIGNAL {f.stopsignal}")
    url = f"http://127.0.0.1:{f.port}/healthz"
    check(url in f.healthcheck, f"HEALTHCHECK probes {url}")
    probe = f.healthcheck[0]
    copies = " ".join(instr(f.final, "COPY"))
    check(re.search(rf"\s{re.escape(probe)}(\s|$)", copies) is not None,
          f"the HEALTHCHECK's tool {probe} is copied into the image")
    check(re.search(rf"\s{re.escape(f.binary)}(\s|$)", copies) is not None,
          f"the binary is copied to {f.binary}")
    check(re.search(rf"--chown={f.uid}:{f.gid}\s.*\s{re.escape(f.data_dir)}(\s|$)", copies) is not None,
          f"{f.data_dir} is created owned by {f.uid}:{f.gid} (a fresh named volume copies it)")
    run = " ".join(instr(f.build, "RUN"))
    manifest = tomllib.loads((ROOT / "Cargo.toml").read_text())
    bins = [b["name"] for b in manifest.get("bin", [])]
    check("tidewire" in bins, f"Cargo.toml has the bin `tidewire` ({bins})")
    check("cargo build --release --locked --bin tidewire" in run, "the build is `cargo build --release --locked --bin tidewire`")
    check(re.search(r"target/release/tidewire\s+/out/tidewire", run) is not None
          and "/out/tidewire " + f.binary in copies.replace("--from=build ", ""),
          f"target/release/tidewire is what lands at {f.binary}")
    # Every file the manifest names must be in the build stage, and not ignored.
    copied = []
    for a in instr(f.build, "COPY"):
        parts = [p for p in a.split() if not p.startswith("--")]
        copied += parts[:-1]
    ignore = [l.strip() for l in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if l.strip() and not l.strip().startswith("#")]
    kept = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    check(ignore[:1] == ["*"], "Dockerfile.dockerignore starts from `*` (send nothing by default)")
    needed = ["Cargo.toml", "Cargo.lock"]
    dirs = {"bin": "src/bin", "bench": "benches", "example": "examples", "test": "tests"}
    for sect, d in dirs.items():
        for t in manifest.get(sect, []):
            if "path" in t:
                needed.append(t["path"])
            elif not (sect == "bin" and t["name"] == manifest["package"]["name"]):
                needed.append(f"{d}/{t['name']}.rs")
    needed += [manifest["lib"]["path"]] if "path" in manifest.get("lib", {}) else []
    if manifest["package"].get("build"):
        needed.append(manifest["package"]["build"])
    elif (ROOT / "build.rs").exists():
        needed.append("build.rs")
    for n in needed:
        top = n.split("/")[0]
        check(top in copied and top in kept and (ROOT / n).exists(),
              f"{n}: exists, COPY'd into the build stage and kept by the ignore file")
    proc = subprocess.run(["cargo", "metadata", "--locked", "--offline", "--format-version", "1", "--no-deps"],
                          cwd=ROOT, capture_output=True, text=True)
    check(proc.returncode == 0, "Cargo.lock is current (`--locked` builds): " + (proc.stderr.strip()[-200:] or "yes"))

    print("# docker-compose.yml")
    svc = f.compose["services"]["tidewire"]
    ngx = f.compose["services"]["nginx"]
    check(svc["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"},
          "tidewire is built from the repository root with deploy/Dockerfile")
    mounts = [v.split(":") for v in svc.get("volumes", [])]
    named = f.compose.get("volumes", {})
    check(any(m[0] in named and m[1] == f.data_dir for m in mounts), f"a named volume is mounted at {f.data_dir}")
    env = svc.get("environment", {})
    secret_file = env.get("TIDEWIRE_JWT_SECRET_FILE", "")
    targets = ["/run/secrets/" + (s["target"] if isinstance(s, dict) else s) for s in svc.get("secrets", [])]
    check(secret_file in targets, f"TIDEWIRE_JWT_SECRET_FILE {secret_file} is the mounted compose secret {targets}")
    stop = seconds(svc.get("stop_grace_period", 10))
    check(stop >= grace_default + FLUSH_MARGIN,
          f"stop_grace_period {stop:g}s >= shutdown_grace_secs {grace_default} + {FLUSH_MARGIN}s for the flush")
    check(svc.get("stop_signal", "SIGTERM") == "SIGTERM", "stop_signal SIGTERM")
    test = svc["healthcheck"]["test"]
    check(f"http://127.0.0.1:{f.port}/readyz" in test and test[1] == probe,
          f"compose healthcheck probes /readyz on {f.port} with the image's {probe}")
    check(ngx.get("depends_on", {}).get("tidewire", {}).get("condition") == "service_healthy",
          "nginx depends_on tidewire: condition service_healthy")
    check(svc.get("read_only") is True and svc.get("cap_drop") == ["ALL"]
          and "no-new-privileges:true" in svc.get("security_opt", []),
          "read-only root filesystem, all capabilities dropped, no-new-privileges")
    nofile = svc.get("ulimits", {}).get("nofile", {})
    check(min(nofile.get("soft", 0), nofile.get("hard", 0)) >= MIN_NOFILE, f"ulimits nofile >= {MIN_NOFILE}")
    site = None
    for v in ngx.get("volumes", []):
        src, dst = v.split(":")[:2]
        if dst.startswith("/etc/nginx/conf.d/"):
            site = (DEPLOY / src).resolve()
    check(site == DEPLOY / "compose" / "nginx.conf", f"nginx mounts deploy/compose/nginx.conf as its site ({site})")
    compose_site = (DEPLOY / "compose" / "nginx.conf").read_text()
    up = re.search(r"^\s*server\s+tidewire:(\d+);", compose_site, re.M)
    check(up is not None and int(up.group(1)) == f.port, f"compose nginx proxies to tidewire:{f.port}")
    listen = re.search(r"^\s*listen\s+(\d+);", compose_site, re.M)
    published = [str(p).split(":")[-1] for p in ngx.get("ports", [])]
    check(listen is not None and listen.group(1) in published,
          f"compose nginx listens on the port it publishes ({published})")
    host = (DEPLOY / "nginx.conf").read_text()
    derived = host.replace("server 127.0.0.1:7700;", f"server tidewire:{f.port};").replace(
        "listen 127.0.0.1:8080;", "listen 80;")
    a, b = site_lines(derived), site_lines(compose_site)
    diff = [f"{x!r} != {y!r}" for x, y in zip(a, b) if x != y] + (["line counts differ"] if len(a) != len(b) else [])
    check(not diff, "deploy/compose/nginx.conf is deploy/nginx.conf but for its two addresses"
          + ("" if not diff else ": " + "; ".join(diff[:3])))

    print("# k8s/")
    sts = f.kind("StatefulSet")
    check(len(sts) == 1, "one StatefulSet")
    sts = sts[0]
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    check(spec["replicas"] == 1, "replicas: 1 (the log is local)")
    headless = [s for s in f.kind("Service") if s["spec"].get("clusterIP") == "None"]
    check([s["metadata"]["name"] for s in headless] == [spec["serviceName"]],
          f"serviceName {spec['serviceName']} is the headless Service")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    for s in f.kind("Service"):
        sel = s["spec"]["selector"]
        check(all(labels.get(k) == v for k, v in sel.items()), f"Service {s['metadata']['name']} selects the pod")
    check(all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items()), "the selector matches the pod")
    c = pod["containers"][0]
    args = c["args"]
    check(args[0] == "serve", "the container runs `serve` (the image's ENTRYPOINT is the binary)")
    kport = port_of(flag(args, "--listen"))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    check(kport == f.port and list(ports.values()) == [f.port],
          f"--listen port {kport} = containerPort {list(ports.values())} = the image's EXPOSE {f.port}")
    for s in f.kind("Service"):
        for p in s["spec"]["ports"]:
            t = p["targetPort"]
            check(ports.get(t, t) == f.port, f"Service {s['metadata']['name']} targets {f.port}")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    claims = [t["metadata"]["name"] for t in spec["volumeClaimTemplates"]]
    kdata = flag(args, "--data-dir")
    check(kdata == f.data_dir and kdata in mounts and mounts[kdata]["name"] in claims,
          f"--data-dir {kdata} = the image's volume, on the volumeClaimTemplate {claims}")
    vols = {v["name"]: v for v in pod["volumes"]}
    cfg = flag(args, "--config")
    cfg_dir, cfg_name = cfg.rsplit("/", 1)
    cm = f.kind("ConfigMap")[0]
    check(cfg_dir in mounts and vols[mounts[cfg_dir]["name"]].get("configMap", {}).get("name") == cm["metadata"]["name"]
          and cfg_name in cm["data"], f"--config {cfg} is the ConfigMap's {cfg_name}")
    conf = tomllib.loads(f.configmap_toml())
    unknown = sorted(set(conf) - f.keys)
    check(not unknown, f"every ConfigMap key is a config key of deploy/tidewire.toml ({unknown or 'yes'})")
    check("listen" not in conf and "data_dir" not in conf, "the ConfigMap leaves listen and data_dir to the flags")
    jwt = conf.get("jwt_secret_file", "")
    jdir, jname = jwt.rsplit("/", 1) if "/" in jwt else ("", "")
    secret = f.kind("Secret")[0]
    sv = vols.get(mounts.get(jdir, {}).get("name"), {}).get("secret", {})
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    check(sv.get("secretName") == secret["metadata"]["name"] and jname in keys,
          f"jwt_secret_file {jwt} is key {jname!r} of the Secret {secret['metadata']['name']}, mounted at {jdir}")
    placeholder = secret.get("stringData", {}).get(jname, "")
    check(len(placeholder.encode()) < 32,
          "the Secret's placeholder is under 32 bytes, so an unedited deploy refuses to start")
    grace = conf.get("shutdown_grace_secs", grace_default)
    tgp = pod["terminationGracePeriodSeconds"]
    check(tgp >= grace + FLUSH_MARGIN,
          f"terminationGracePeriodSeconds {tgp} >= shutdown_grace_secs {grace} + {FLUSH_MARGIN}s for the flush")
    r, l = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    check(r["path"] == "/readyz" and ports.get(r["port"], r["port"]) == f.port, "readinessProbe GET /readyz")
    check(l["path"] == "/healthz" and ports.get(l["port"], l["port"]) == f.port, "livenessProbe GET /healthz")
    lp = c["livenessProbe"]
    check(lp.get("periodSeconds", 10) * lp.get("failureThreshold", 3) > grace,
          "the liveness probe cannot kill the pod within a drain")
    res = c["resources"]
    check(all(k in res.get(w, {}) for w in ("requests", "limits") for k in ("cpu", "memory")),
          "cpu and memory requests and limits")
    psc, csc = pod["securityContext"], c["securityContext"]
    check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == f.uid and psc.get("runAsGroup") == f.gid
          and psc.get("fsGroup") == f.gid, f"runs as the image's {f.uid}:{f.gid}, non-root, volume group {f.gid}")
    check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "seccompProfile RuntimeDefault")
    check(csc.get("readOnlyRootFilesystem") is True and csc.get("allowPrivilegeEscalation") is False
          and csc.get("capabilities", {}).get("drop") == ["ALL"],
          "readOnlyRootFilesystem, no privilege escalation, all capabilities dropped")
    check(pod.get("enableServiceLinks") is False, "enableServiceLinks: false (no stray TIDEWIRE_* variables)")

    print("# systemd/tidewire.service")
    u = f.unit
    exe = shlex.split(u["ExecStart"][-1])
    check(exe[0] == f.binary and exe[1] == "serve", f"ExecStart runs {f.binary} serve, the image's path")
    state = u.get("StateDirectory", [""])[-1]
    check(flag(exe, "--data-dir") == f"/var/lib/{state}" == f.data_dir,
          f"--data-dir is the StateDirectory /var/lib/{state}, the image's data dir")
    upstream = re.search(r"^\s*server\s+(\S+?);", host, re.M).group(1)
    check(flag(exe, "--listen") == upstream, f"--listen {flag(exe, '--listen')} is deploy/nginx.conf's upstream {upstream}")
    stop = seconds(u["TimeoutStopSec"][-1])
    check(stop >= grace_default + FLUSH_MARGIN,
          f"TimeoutStopSec {stop:g}s >= shutdown_grace_secs {grace_default} + {FLUSH_MARGIN}s for the flush")
    check(u.get("KillSignal", ["SIGTERM"])[-1] == "SIGTERM", "KillSignal SIGTERM")
    check(shlex.split(u["ExecReload"][-1])[1:] == ["-HUP", "$MAINPID"], "ExecReload sends SIGHUP (TLS reload)")
    check(int(u["LimitNOFILE"][-1]) >= MIN_NOFILE, f"LimitNOFILE {u['LimitNOFILE'][-1]} >= {MIN_NOFILE}")
    check(bool(u.get("EnvironmentFile")), f"EnvironmentFile {u.get('EnvironmentFile')} (the JWT secret)")
    want = {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
            "NoNewPrivileges": "yes", "CapabilityBoundingSet": "", "MemoryDenyWriteExecute": "yes",
            "SystemCallArchitectures": "native"}
    for k, v in want.items():
        check(u.get(k, [None])[-1] == v, f"{k}={v}")
    check(u.get("DynamicUser", ["no"])[-1] == "yes" or bool(u.get("User")), "DynamicUser=yes or a dedicated User=")
    check("@system-service" in u.get("SystemCallFilter", []), "SystemCallFilter=@system-service")
    check(bool(u.get("RestrictAddressFamilies")), "RestrictAddressFamilies set")

    consistency_jetstream(f)

    print("# TIDEWIRE_* variables")
    texts = {
        "Dockerfile": (DEPLOY / "Dockerfile").read_text(),
        "docker-compose.yml": (DEPLOY / "docker-compose.yml").read_text(),
        "docker-compose.jetstream.yml": COMPOSE_JS.read_text(),
        "systemd/tidewire.service": (DEPLOY / "systemd" / "tidewire.service").read_text(),
    }
    texts.update({f"k8s/{p.name}": p.read_text() for p in (DEPLOY / "k8s").glob("*.yaml")})
    texts.update({f"k8s/jetstream/{p.name}": p.read_text() for p in K8S_JS.glob("*.yaml")})
    for name, text in sorted(texts.items()):
        code = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
        names = set(re.findall(r"\bTIDEWIRE_([A-Z0-9_]+)", code))
        bad = sorted(n for n in names if n.lower() not in f.keys and n not in ("CONFIG",))
        check(not bad, f"{name}: every TIDEWIRE_<KEY> names a config key ({bad or sorted(names) or 'none used'})")


# ---------------------------------------------------------------- run the binary


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, headers=None, timeout=5):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return None, b""


def relocate(argv, port, data):
    """argv with --listen on loopback:port and --data-dir moved to data."""
    out = list(argv)
    for i, a in enumerate(out[:-1]):
        if a == "--listen":
            out[i + 1] = f"127.0.0.1:{port}"
        elif a == "--data-dir":
            out[i + 1] = data
    return out


def serve(name, binary, argv, env, tmp, grace):
    """Starts one deployment's command line, checks it, stops it with SIGTERM."""
    port = free_port()
    data = str(tmp / f"{name}-data")
    print(f"# {name}: {shlex.join(argv[1:])}".replace(str(tmp), "$tmp"))
    argv = [binary] + relocate(argv[1:], port, data)
    print(f"#   run as: tidewire {shlex.join(argv[1:])}".replace(str(tmp), "$tmp"))
    base = f"http://127.0.0.1:{port}"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEWIRE_")}
    full_env.update(env)
    full_env.setdefault("RUST_LOG", "warn")
    log = open(tmp / f"{name}.log", "wb")
    p = subprocess.Popen(argv, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        ready = None
        while time.monotonic() < deadline and p.poll() is None:
            ready, _ = http("GET", base + "/readyz")
            if ready == 200:
                break
            time.sleep(0.1)
        if not check(ready == 200, f"{name}: /readyz 200"):
            log.flush()
            print((tmp / f"{name}.log").read_text()[-2000:])
            return
        check(http("GET", base + "/healthz")[0] == 200, f"{name}: /healthz 200")
        body = b'{"data":{"t":21.5}}'
        ct = {"content-type": "application/json"}
        check(http("POST", base + "/v1/topics/deploy/check/events", body, ct)[0] == 401,
              f"{name}: authorization is on (a publish without a token gets 401)")
        secret = env.get("TIDEWIRE_JWT_SECRET_FILE") or env.get("_SECRET_FILE")
        token = subprocess.run([binary, "token", "--secret-file", secret, "--publish", "deploy/**",
                                "--ttl", "5m"], capture_output=True, text=True, check=True).stdout.strip()
        status, _ = http("POST", base + "/v1/topics/deploy/check/events", body,
                         {**ct, "authorization": f"Bearer {token}"})
        check(status == 201, f"{name}: a publish with a token minted from the deployed secret gets 201")
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(timeout=grace + FLUSH_MARGIN)
        except subprocess.TimeoutExpired:
            rc = None
        took = time.monotonic() - t0
        check(rc == 0, f"{name}: SIGTERM: exit {rc} after {took:.2f}s (allowed {grace + FLUSH_MARGIN}s)")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()


def run(binary):
    f = Facts()
    grace_default = f.sample["shutdown_grace_secs"]
    with tempfile.TemporaryDirectory(prefix="tidewire-deploy-check.") as d:
        tmp = Path(d)
        secret = tmp / "jwt-secret"
        # Like `openssl rand -base64 48`, with its trailing newline (the server drops it).
        secret.write_text(__import__("base64").b64encode(os.urandom(48)).decode() + "\n")

        # The image as compose runs it: ENTRYPOINT + CMD, the compose environment, the secret
        # file where compose mounts it (moved to the temp dir).
        env = {k: str(v) for k, v in f.compose["services"]["tidewire"].get("environment", {}).items()}
        env["TIDEWIRE_JWT_SECRET_FILE"] = str(secret)
        serve("image", binary, f.entrypoint + f.cmd, env, tmp, grace_default)

        # The StatefulSet: its args and env, the ConfigMap's file with the Secret's mount
        # directory moved to the temp dir.
        sts = f.kind("StatefulSet")[0]
        c = sts["spec"]["template"]["spec"]["containers"][0]
        conf_text = f.configmap_toml()
        jwt = tomllib.loads(conf_text)["jwt_secret_file"]
        conf_text = conf_text.replace(jwt, str(secret))
        conf = tmp / "tidewire.toml"
        conf.write_text(conf_text)
        args = list(c["args"])
        args[args.index("--config") + 1] = str(conf)
        env = {e["name"]: e["value"] for e in c.get("env", [])}
        env["_SECRET_FILE"] = str(secret)
        grace = tomllib.loads(conf_text).get("shutdown_grace_secs", grace_default)
        serve("statefulset", binary, [f.binary] + args, env, tmp, grace)

        # The systemd unit: ExecStart, Environment=, and an EnvironmentFile holding the secret.
        exe = shlex.split(f.unit["ExecStart"][-1])
        env = dict(e.split("=", 1) for v in f.unit.get("Environment", []) for e in shlex.split(v))
        env["TIDEWIRE_JWT_SECRET"] = secret.read_text().strip()
        env["_SECRET_FILE"] = str(secret)
        serve("systemd", binary, exe, env, tmp, grace_default)


# ---------------------------------------------------------------- the JetStream mode (facts)

COMPOSE_JS = DEPLOY / "docker-compose.jetstream.yml"
NATS_CONF = DEPLOY / "nats" / "nats.conf"
NGINX_JS = DEPLOY / "compose" / "nginx.jetstream.conf"
K8S_JS = DEPLOY / "k8s" / "jetstream"
# JetStream atomic batch publish, which the gateways use, needs nats-server 2.12 or newer.
MIN_NATS = (2, 12)


def nats_conf(text):
    """A NATS server config, the subset deploy/ writes, as nested dicts and lists of strings:
    `key: value` (also `key = value`, `key value`), blocks `key { … }`, arrays `key: [ … ]` (one
    item a line, or comma-separated), `#` and `//` comments. Values stay text ($VARS included)."""
    root, stack, arr = {}, [], None
    cur = root

    def items(s):
        return [i.strip().strip('"') for i in s.split(",") if i.strip()]

    for n, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)(#|//).*$", "", raw).strip()
        if not line:
            continue
        if arr is not None:
            arr += items(line.rstrip("]"))
            if line.endswith("]"):
                arr = None
            continue
        if line == "}":
            if not stack:
                raise ValueError(f"line {n}: unmatched }}")
            cur = stack.pop()
            continue
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?:[:=]\s*|\s+)(.+)$", line)
        if not m:
            raise ValueError(f"line {n}: cannot read {raw.strip()!r}")
        key, val = m.group(1), m.group(2).strip()
        if val == "{":
            stack.append(cur)
            cur[key] = {}
            cur = cur[key]
        elif val.startswith("["):
            cur[key] = items(val[1:].rstrip("]"))
            if not val.endswith("]"):
                arr = cur[key]
        else:
            cur[key] = val.strip('"')
    if stack or arr is not None:
        raise ValueError("a block or array is not closed")
    return root


def nbytes(v):
    """A size: NATS's 8G / 256M (powers of 1000, as nats-server reads them) or Kubernetes' 10Gi."""
    m = re.fullmatch(r"(\d+)\s*([KMGT]i?)?B?", str(v))
    if not m:
        raise ValueError(f"not a size: {v!r}")
    unit = m.group(2) or ""
    base = 1024 if unit.endswith("i") else 1000
    return int(m.group(1)) * base ** ("KMGT".index(unit[0]) + 1 if unit else 0)


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def image_version(image):
    """(2, 15, 1) of nats:2.15.1-alpine."""
    m = re.match(r"^[^:]+:(\d+)\.(\d+)(?:\.(\d+))?", image)
    return tuple(int(x) for x in m.groups() if x is not None) if m else ()


def pinned_nats_version():
    """The nats-server version deploy/check.sh installs (nats_version=…)."""
    m = re.search(r"^nats_version=([0-9.]+)$", (DEPLOY / "check.sh").read_text(), re.M)
    return m.group(1) if m else None


class JetStream:
    """The JetStream-mode files: compose, the NATS configs, the k8s/jetstream manifests."""

    def __init__(self):
        self.compose = yaml.safe_load(COMPOSE_JS.read_text())
        svcs = self.compose["services"]
        self.gateways = {n: s for n, s in svcs.items() if s.get("build")}
        self.nats = {n: s for n, s in svcs.items() if str(s.get("image", "")).startswith("nats:")}
        self.nginx = svcs.get("nginx", {})
        self.conf_text = NATS_CONF.read_text()
        self.conf = nats_conf(self.conf_text)
        self.k8s = []
        for p in sorted(K8S_JS.glob("*.yaml")):
            self.k8s += [(p.name, d) for d in yaml.safe_load_all(p.read_text()) if d]
        self.deploy = self.one("Deployment")
        self.sts = self.one("StatefulSet")
        gw_pod = self.deploy["spec"]["template"]["spec"]
        self.gw_container = gw_pod["containers"][0]
        self.gw_vols = {v["name"]: v for v in gw_pod["volumes"]}
        self.gw_mounts = {m["mountPath"]: m for m in self.gw_container["volumeMounts"]}
        args = self.gw_container["args"]
        cfg_dir, self.gw_cfg_name = flag(args, "--config").rsplit("/", 1)
        cm_name = self.gw_vols[self.gw_mounts[cfg_dir]["name"]]["configMap"]["name"]
        self.gw_cm = self.named("ConfigMap", cm_name)
        self.gw_toml_text = self.gw_cm["data"][self.gw_cfg_name]
        self.gw_toml = tomllib.loads(self.gw_toml_text)
        nats_pod = self.sts["spec"]["template"]["spec"]
        self.nats_container = nats_pod["containers"][0]
        self.nats_vols = {v["name"]: v for v in nats_pod["volumes"]}
        self.nats_mounts = {m["mountPath"]: m for m in self.nats_container["volumeMounts"]}
        ncfg = flag(self.nats_container["args"], "--config")
        ndir, self.nats_cfg_name = ncfg.rsplit("/", 1)
        ncm = self.nats_vols[self.nats_mounts[ndir]["name"]]["configMap"]["name"]
        self.nats_cm = self.named("ConfigMap", ncm)
        self.k8s_conf_text = self.nats_cm["data"][self.nats_cfg_name]
        self.k8s_conf = nats_conf(self.k8s_conf_text)
        self.headless = self.named("Service", self.sts["spec"]["serviceName"])

    def kind(self, kind):
        return [d for _, d in self.k8s if d.get("kind") == kind]

    def one(self, kind):
        docs = self.kind(kind)
        if len(docs) != 1:
            raise SystemExit(f"deploy/k8s/jetstream/ should hold one {kind}, not {len(docs)}")
        return docs[0]

    def named(self, kind, name):
        docs = [d for d in self.kind(kind) if d["metadata"]["name"] == name]
        if len(docs) != 1:
            raise SystemExit(f"deploy/k8s/jetstream/ has no {kind} {name}")
        return docs[0]

    def pod_names(self):
        name, n = self.sts["metadata"]["name"], self.sts["spec"]["replicas"]
        return [f"{name}-{i}" for i in range(n)]

    def nats_configs(self):
        """Each NATS config as its nodes run it: label, text, the nodes' names and environments,
        how a node is stopped, and the host:port each node's clients use (for relocation)."""
        out = []
        nodes = []
        for name, svc in self.nats.items():
            env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
            nodes.append((name, env, f"{name}:{self.conf['port']}"))
        svc0 = next(iter(self.nats.values()))
        out.append({"label": "compose deploy/nats/nats.conf", "tag": "compose", "text": self.conf_text,
                    "conf": self.conf, "nodes": nodes, "prestop": None,
                    "signal": svc0.get("stop_signal", "SIGTERM"), "timeout": seconds(svc0["stop_grace_period"])})
        nodes = []
        headless = self.headless["metadata"]["name"]
        for pod in self.pod_names():
            env = {}
            for e in self.nats_container.get("env", []):
                if "value" in e:
                    env[e["name"]] = e["value"]
                elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
                    env[e["name"]] = pod
            nodes.append((pod, env, f"{pod}.{headless}:{self.k8s_conf['port']}"))
        pre = self.nats_container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        pod = self.sts["spec"]["template"]["spec"]
        out.append({"label": f"k8s/jetstream/{self.file_of(self.nats_cm)} nats.conf", "tag": "k8s",
                    "text": self.k8s_conf_text, "conf": self.k8s_conf, "nodes": nodes, "prestop": pre,
                    "signal": "SIGTERM", "timeout": float(pod["terminationGracePeriodSeconds"])})
        return out

    def file_of(self, doc):
        return next(n for n, d in self.k8s if d is doc)


# ---------------------------------------------------------------- the JetStream mode (consistency)


def check_nats_conf(label, conf, route_hosts, stop_secs, stop_what):
    """The settings every NATS config here must have."""
    js, cl = conf.get("jetstream", {}), conf.get("cluster", {})
    check(js.get("sync_interval") == "always",
          f"{label}: jetstream sync_interval always (an ack is on disk, not only in the page cache)")
    check(bool(js.get("store_dir")), f"{label}: jetstream store_dir {js.get('store_dir')}")
    check(conf.get("server_name") == "$SERVER_NAME", f"{label}: server_name from $SERVER_NAME (one per node)")
    check(bool(cl.get("name")) and cl.get("port", "").isdigit(), f"{label}: cluster {cl.get('name')} on port {cl.get('port')}")
    want = sorted(f"nats://{h}:{cl.get('port')}" for h in route_hosts)
    check(sorted(cl.get("routes", [])) == want, f"{label}: the routes are the {len(want)} nodes: {want}")
    check(conf.get("port", "").isdigit() and conf.get("http_port", "").isdigit(),
          f"{label}: client port {conf.get('port')}, monitoring port {conf.get('http_port')}")
    ld = seconds(conf.get("lame_duck_grace_period", "10s")) + seconds(conf.get("lame_duck_duration", "2m"))
    check(ld < stop_secs, f"{label}: lame duck (grace + duration, {ld:g}s) ends before {stop_what} ({stop_secs:g}s)")


def consistency_jetstream(f):
    js = JetStream()
    port, data_dir = f.port, f.data_dir
    grace = f.sample["shutdown_grace_secs"]
    pinned = pinned_nats_version()

    print("# docker-compose.jetstream.yml")
    single = f.compose["services"]["tidewire"]
    nats_names = list(js.nats)
    check(len(nats_names) == 3, f"three NATS services: {nats_names}")
    images = {s["image"] for s in js.nats.values()}
    image = next(iter(images))
    check(len(images) == 1 and image_version(image) >= MIN_NATS,
          f"every NATS node runs one image, nats-server >= {'.'.join(map(str, MIN_NATS))}: {sorted(images)}")
    check(pinned is not None and image_version(image) == tuple(int(x) for x in pinned.split(".")),
          f"the NATS image is the nats-server check.sh tests the configs with ({image} vs {pinned})")
    conf_port, http_port = js.conf.get("port"), js.conf.get("http_port")
    store = js.conf.get("jetstream", {}).get("store_dir")
    server_names = []
    for name, s in js.nats.items():
        cfg = flag(s.get("command", []), "--config")
        mounts = {v.split(":")[1]: v for v in s.get("volumes", [])}
        src = mounts.get(cfg, "").split(":")[0]
        check(cfg is not None and (DEPLOY / src).resolve() == NATS_CONF and mounts[cfg].endswith(":ro"),
              f"{name}: --config {cfg} is deploy/nats/nats.conf, read-only")
        vol = mounts.get(store, "").split(":")[0]
        check(vol in (js.compose.get("volumes") or {}), f"{name}: the store_dir {store} is the named volume {vol!r}")
        server_names.append((s.get("environment") or {}).get("SERVER_NAME"))
        hc = " ".join(s.get("healthcheck", {}).get("test", []))
        check(f"http://127.0.0.1:{http_port}/healthz" in hc, f"{name}: healthcheck GET /healthz on the monitoring port {http_port}")
        check(not s.get("ports"), f"{name}: publishes no host port")
        check(s.get("read_only") is True and s.get("cap_drop") == ["ALL"]
              and "no-new-privileges:true" in s.get("security_opt", []),
              f"{name}: read-only root filesystem, all capabilities dropped, no-new-privileges")
        check(s.get("stop_signal") == "SIGUSR2", f"{name}: stop_signal SIGUSR2 (nats-server's lame-duck mode)")
    check(server_names == nats_names, f"each node's SERVER_NAME is its service name: {server_names}")
    stop = seconds(next(iter(js.nats.values()))["stop_grace_period"])
    check_nats_conf("deploy/nats/nats.conf", js.conf, nats_names, stop, "stop_grace_period")

    gws = list(js.gateways)
    check(len(gws) >= 2, f"at least two gateways: {gws}")
    first = js.gateways[gws[0]]
    check(all(js.gateways[g] == first for g in gws), "the gateways are defined identically (one anchor)")
    check(first["build"] == f.compose["services"]["tidewire"]["build"] and first.get("image") == single.get("image"),
          f"the gateways are built from deploy/Dockerfile like docker-compose.yml's tidewire ({first.get('image')})")
    cmd = first.get("command", [])
    check(cmd[:1] == ["serve"], "the gateways run `serve` (the image's ENTRYPOINT is the binary)")
    listen = flag(cmd, "--listen") or ""
    check(listen == f"0.0.0.0:{port}", f"--listen {listen} is the image's port {port} on every interface")
    check(flag(cmd, "--data-dir") == data_dir, f"--data-dir {flag(cmd, '--data-dir')} is the image's VOLUME")
    check(flag(cmd, "--log") == "nats", "--log nats")
    urls = (flag(cmd, "--nats-url") or "").split(",")
    want = sorted(f"nats://{n}:{conf_port}" for n in nats_names)
    check(sorted(urls) == want, f"--nats-url lists every NATS node's client port: {urls}")
    stream, replicas = flag(cmd, "--nats-stream"), flag(cmd, "--nats-replicas")
    check(bool(stream), f"--nats-stream {stream}")
    check(replicas is not None and int(replicas) == 3 == len(nats_names),
          f"--nats-replicas {replicas}: R3 over the three nodes (losing one loses nothing)")
    genv = dict(first.get("environment") or {})
    total = int(genv.pop("TIDEWIRE_RETENTION_MAX_TOTAL_BYTES", 0))
    check(genv == single.get("environment") and first.get("secrets") == single.get("secrets")
          and js.compose.get("secrets") == f.compose.get("secrets"),
          "the JWT secret and environment are docker-compose.yml's (compose secret tidewire-jwt), "
          "plus TIDEWIRE_RETENTION_MAX_TOTAL_BYTES")
    mfs = nbytes(js.conf.get("jetstream", {}).get("max_file_store", "0"))
    check(0 < total < mfs, f"retention_max_total_bytes {total} (the stream's max_bytes) is below each node's "
          f"max_file_store {mfs}: a full store drops the oldest events instead of refusing publishes")
    hc = " ".join(first.get("healthcheck", {}).get("test", []))
    check(f"http://127.0.0.1:{port}/readyz" in hc, "the gateways' healthcheck is GET /readyz (connected, caught up)")
    dep = first.get("depends_on", {})
    check(sorted(dep) == sorted(nats_names) and all(d.get("condition") == "service_healthy" for d in dep.values()),
          "the gateways wait for every NATS node's healthcheck")
    gstop = seconds(first.get("stop_grace_period", 10))
    check(first.get("stop_signal", "SIGTERM") == "SIGTERM" and gstop >= grace + FLUSH_MARGIN,
          f"the gateways stop on SIGTERM with stop_grace_period {gstop:g}s >= shutdown_grace_secs {grace} + {FLUSH_MARGIN}s")
    check(first.get("read_only") is True and first.get("cap_drop") == ["ALL"]
          and "no-new-privileges:true" in first.get("security_opt", []),
          "gateways: read-only root filesystem, all capabilities dropped, no-new-privileges")
    nofile = first.get("ulimits", {}).get("nofile", {})
    check(min(nofile.get("soft", 0), nofile.get("hard", 0)) >= MIN_NOFILE, f"gateways: ulimits nofile >= {MIN_NOFILE}")

    ngx = js.nginx
    ndep = ngx.get("depends_on", {})
    check(sorted(ndep) == sorted(gws) and all(d.get("condition") == "service_healthy" for d in ndep.values()),
          "nginx depends_on every gateway: condition service_healthy")
    check(ngx.get("image") == f.compose["services"]["nginx"]["image"] and ngx.get("ports") == f.compose["services"]["nginx"]["ports"],
          f"nginx: docker-compose.yml's image and port ({ngx.get('image')}, {ngx.get('ports')})")
    site = None
    for v in ngx.get("volumes", []):
        src, dst = v.split(":")[:2]
        if dst.startswith("/etc/nginx/conf.d/"):
            site = (DEPLOY / src).resolve()
    check(site == NGINX_JS, f"nginx mounts deploy/compose/nginx.jetstream.conf as its site ({site})")

    print("# compose/nginx.jetstream.conf")
    text = NGINX_JS.read_text()
    ups = re.findall(r"^\s*server\s+(\S+?);", text, re.M)
    check(sorted(ups) == sorted(f"{g}:{port}" for g in gws), f"the upstream is every gateway: {ups}")
    listen = re.search(r"^\s*listen\s+(\d+);", text, re.M)
    published = [str(p).split(":")[-1] for p in ngx.get("ports", [])]
    check(listen is not None and listen.group(1) in published, f"nginx listens on the port it publishes ({published})")
    host = (DEPLOY / "nginx.conf").read_text()
    derived = host.replace("    server 127.0.0.1:7700;\n", "".join(f"    server {u};\n" for u in ups)).replace(
        "listen 127.0.0.1:8080;", "listen 80;")
    a, b = site_lines(derived), site_lines(text)
    diff = [f"{x!r} != {y!r}" for x, y in zip(a, b) if x != y] + (["line counts differ"] if len(a) != len(b) else [])
    check(not diff, "deploy/compose/nginx.jetstream.conf is deploy/nginx.conf but for its addresses (listen, upstream)"
          + ("" if not diff else ": " + "; ".join(diff[:3])))

    print("# k8s/jetstream/")
    sts_single = f.kind("StatefulSet")[0]
    s_pod = sts_single["spec"]["template"]["spec"]
    s_c = s_pod["containers"][0]
    d = js.deploy
    pod = d["spec"]["template"]["spec"]
    c = js.gw_container
    labels = d["spec"]["template"]["metadata"]["labels"]
    check(d["spec"].get("replicas", 1) >= 2, f"Deployment {d['metadata']['name']}: {d['spec'].get('replicas')} replicas (stateless)")
    check(selects(d["spec"]["selector"]["matchLabels"], labels), "the Deployment's selector matches its pods")
    args = c["args"]
    check(args[0] == "serve" and flag(args, "--listen") == flag(s_c["args"], "--listen")
          and flag(args, "--data-dir") == flag(s_c["args"], "--data-dir") == data_dir,
          f"args: serve --listen {flag(args, '--listen')} --data-dir {flag(args, '--data-dir')}, as statefulset.yaml's")
    dv = js.gw_vols.get(js.gw_mounts.get(flag(args, "--data-dir"), {}).get("name"), {})
    check("emptyDir" in dv, f"--data-dir is an emptyDir ({sorted(dv)})")
    check(c["image"] == s_c["image"], f"the image is statefulset.yaml's ({c['image']})")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    check(list(ports.values()) == [port], f"containerPort {list(ports.values())} = the image's EXPOSE {port}")
    for k in ("readinessProbe", "livenessProbe", "resources", "securityContext"):
        check(c.get(k) == s_c.get(k), f"container {k} is statefulset.yaml's")
    for k in ("securityContext", "terminationGracePeriodSeconds", "enableServiceLinks", "automountServiceAccountToken"):
        check(pod.get(k) == s_pod.get(k), f"pod {k} is statefulset.yaml's ({pod.get(k) if not isinstance(pod.get(k), dict) else '…'})")
    conf = js.gw_toml
    unknown = sorted(set(conf) - f.keys)
    check(not unknown, f"every key of the gateway ConfigMap is a config key ({unknown or 'yes'})")
    check("listen" not in conf and "data_dir" not in conf, "the gateway ConfigMap leaves listen and data_dir to the flags")
    check(conf.get("log") == "nats", f"log = {conf.get('log')!r}")
    total = conf.get("retention_max_total_bytes", 0)
    mfs = nbytes(js.k8s_conf.get("jetstream", {}).get("max_file_store", "0"))
    check(0 < total < mfs, f"retention_max_total_bytes {total} (the stream's max_bytes) is below each pod's "
          f"max_file_store {mfs}")
    check(conf.get("nats_stream") == stream, f"nats_stream {conf.get('nats_stream')!r} = compose's --nats-stream {stream!r}")
    nrep = js.sts["spec"]["replicas"]
    check(replicas is not None and conf.get("nats_replicas") == int(replicas) == nrep,
          f"nats_replicas {conf.get('nats_replicas')} = compose's --nats-replicas {replicas} = the NATS StatefulSet's replicas {nrep}")
    headless = js.headless["metadata"]["name"]
    want = sorted(f"nats://{p}.{headless}:{js.k8s_conf.get('port')}" for p in js.pod_names())
    check(sorted(conf.get("nats_urls", [])) == want, f"nats_urls are every NATS pod's client port: {want}")
    jwt = conf.get("jwt_secret_file", "")
    jdir, jname = jwt.rsplit("/", 1) if "/" in jwt else ("", "")
    secret = f.kind("Secret")[0]
    sv = js.gw_vols.get(js.gw_mounts.get(jdir, {}).get("name"), {}).get("secret", {})
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    check(sv.get("secretName") == secret["metadata"]["name"] and jname in keys,
          f"jwt_secret_file {jwt} is key {jname!r} of deploy/k8s/secret.yaml's Secret {secret['metadata']['name']}")
    g = conf.get("shutdown_grace_secs", grace)
    check(pod["terminationGracePeriodSeconds"] >= g + FLUSH_MARGIN,
          f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} >= shutdown_grace_secs {g} + {FLUSH_MARGIN}s")

    svc_gw = [s for s in js.kind("Service") if selects(s["spec"].get("selector"), labels)]
    check(len(svc_gw) == 1, f"one Service selects the gateways: {[s['metadata']['name'] for s in svc_gw]}")
    for s in svc_gw:
        check(all(ports.get(p["targetPort"], p["targetPort"]) == port for p in s["spec"]["ports"]),
              f"Service {s['metadata']['name']} targets {port}")
    single_labels = sts_single["spec"]["template"]["metadata"]["labels"]
    nats_labels = js.sts["spec"]["template"]["metadata"]["labels"]
    check(not any(selects(s["spec"].get("selector"), labels) or selects(s["spec"].get("selector"), nats_labels)
                  for s in f.kind("Service"))
          and not any(selects(s["spec"].get("selector"), single_labels) for s in js.kind("Service")),
          "deploy/k8s/ and deploy/k8s/jetstream/ Services never select each other's pods")

    sts = js.sts
    spod = sts["spec"]["template"]["spec"]
    nc = js.nats_container
    check(nrep == 3, f"NATS StatefulSet {sts['metadata']['name']}: 3 replicas")
    check(selects(sts["spec"]["selector"]["matchLabels"], nats_labels), "the NATS selector matches its pods")
    check(js.headless["spec"].get("clusterIP") == "None" and js.headless["spec"].get("publishNotReadyAddresses") is True
          and selects(js.headless["spec"]["selector"], nats_labels),
          f"serviceName {headless} is a headless Service of the NATS pods, publishing not-ready pods (routes resolve early)")
    check(sts["spec"].get("podManagementPolicy") == "Parallel", "podManagementPolicy Parallel (a quorum must form)")
    check(nc["image"] == image, f"the NATS image is compose's ({nc['image']})")
    check_nats_conf(f"k8s/jetstream/{js.file_of(js.nats_cm)}", js.k8s_conf,
                    [f"{p}.{headless}" for p in js.pod_names()],
                    float(spod["terminationGracePeriodSeconds"]), "terminationGracePeriodSeconds")
    strip = lambda cf: {**cf, "pid_file": None, "cluster": {**cf.get("cluster", {}), "routes": None}}
    check(strip(js.k8s_conf) == strip(js.conf), "the k8s nats.conf is deploy/nats/nats.conf but for its routes and pid_file")
    env = {e["name"]: e for e in nc.get("env", [])}
    check(env.get("SERVER_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
          "SERVER_NAME is the pod's name")
    nports = {p["name"]: p["containerPort"] for p in nc["ports"]}
    kc = js.k8s_conf
    check(nports == {"client": int(kc["port"]), "cluster": int(kc["cluster"]["port"]), "monitor": int(kc["http_port"])},
          f"containerPorts {nports} are nats.conf's ports")
    for p in js.headless["spec"]["ports"]:
        check(nports.get(p["targetPort"], p["targetPort"]) == p["port"], f"Service {headless} port {p['name']} -> {p['port']}")
    claims = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    kstore = kc["jetstream"]["store_dir"]
    claim = claims.get(js.nats_mounts.get(kstore, {}).get("name"))
    check(claim is not None, f"store_dir {kstore} is on a volumeClaimTemplate ({sorted(claims)})")
    if claim:
        size = nbytes(claim["spec"]["resources"]["requests"]["storage"])
        mfs = nbytes(kc["jetstream"].get("max_file_store", "0"))
        check(0 < mfs < size, f"max_file_store {kc['jetstream'].get('max_file_store')} is below the PVC's "
              f"{claim['spec']['resources']['requests']['storage']}")
    pid = kc.get("pid_file", "")
    pv = js.nats_vols.get(js.nats_mounts.get(pid.rsplit("/", 1)[0], {}).get("name"), {})
    check("emptyDir" in pv, f"pid_file {pid} is on a writable emptyDir (the root filesystem is read-only)")
    pre = nc.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    check(pre == ["nats-server", f"-sl=ldm={pid}"], f"preStop puts nats-server in lame-duck mode via {pid}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        h = nc.get(probe, {}).get("httpGet", {})
        check(h.get("path", "").startswith("/healthz") and nports.get(h.get("port"), h.get("port")) == int(kc["http_port"]),
              f"NATS {probe} GET {h.get('path')} on the monitoring port")
    psc, csc = spod["securityContext"], nc["securityContext"]
    check(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0 and psc.get("fsGroup") is not None
          and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
          "NATS runs non-root with a volume group, seccompProfile RuntimeDefault")
    check(csc.get("readOnlyRootFilesystem") is True and csc.get("allowPrivilegeEscalation") is False
          and csc.get("capabilities", {}).get("drop") == ["ALL"],
          "NATS: readOnlyRootFilesystem, no privilege escalation, all capabilities dropped")
    res = nc.get("resources", {})
    check(all(k in res.get(w, {}) for w in ("requests", "limits") for k in ("cpu", "memory")),
          "NATS: cpu and memory requests and limits")
    check(spod.get("enableServiceLinks") is False and spod.get("automountServiceAccountToken") is False,
          "NATS: no service links, no service account token")
    tsc = spod.get("topologySpreadConstraints", [])
    check(any(t.get("topologyKey") == "kubernetes.io/hostname" and selects(t["labelSelector"]["matchLabels"], nats_labels)
              for t in tsc), "NATS pods spread over nodes (losing a node loses one copy)")

    pdbs = js.kind("PodDisruptionBudget")
    pn = [p for p in pdbs if selects(p["spec"]["selector"]["matchLabels"], nats_labels)]
    pg = [p for p in pdbs if selects(p["spec"]["selector"]["matchLabels"], labels)]
    check(len(pn) == 1 and pn[0]["spec"].get("maxUnavailable") == 1, "a PodDisruptionBudget keeps the NATS quorum: maxUnavailable 1")
    check(len(pg) == 1 and (pg[0]["spec"].get("maxUnavailable") == 1 or pg[0]["spec"].get("minAvailable", 0) >= 1),
          "a PodDisruptionBudget keeps gateways serving")
    for np in js.kind("NetworkPolicy"):
        if not selects(np["spec"]["podSelector"].get("matchLabels"), nats_labels):
            continue
        allowed = {}
        for rule in np["spec"].get("ingress", []):
            for src in rule.get("from", []):
                for p in rule.get("ports", []):
                    who = "gateways" if selects(src.get("podSelector", {}).get("matchLabels"), labels) else (
                        "nats" if selects(src.get("podSelector", {}).get("matchLabels"), nats_labels) else "other")
                    allowed.setdefault(who, set()).add(nports.get(p["port"], p["port"]))
        check(int(kc["port"]) in allowed.get("gateways", set()), f"NetworkPolicy {np['metadata']['name']}: gateways reach the client port")
        check(int(kc["cluster"]["port"]) in allowed.get("nats", set()) and "other" not in allowed,
              f"NetworkPolicy {np['metadata']['name']}: only NATS pods reach the cluster port, nobody else is let in")


# ---------------------------------------------------------------- the JetStream mode (NATS)


def get_json(url):
    status, body = http("GET", url)
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, None


def nats_t(nats_bin):
    """`nats-server -t -c FILE` on every NATS config, with each node's environment."""
    js = JetStream()
    print("# " + subprocess.run([nats_bin, "--version"], capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory(prefix="tidewire-deploy-check.") as d:
        tmp = Path(d)
        for cfg in js.nats_configs():
            path = NATS_CONF if cfg["tag"] == "compose" else tmp / f"{cfg['tag']}-nats.conf"
            if cfg["tag"] != "compose":
                path.write_text(cfg["text"])
            for name, env, _ in cfg["nodes"]:
                r = subprocess.run([nats_bin, "-t", "-c", str(path)], env={**os.environ, **env},
                                   capture_output=True, text=True)
                out = (r.stdout + r.stderr).strip()
                check(r.returncode == 0 and "is valid" in out,
                      f"nats-server -t: {cfg['label']} as {name} ({shlex.join(f'{k}={v}' for k, v in env.items())})"
                      + ("" if r.returncode == 0 else f": {out}"))
        # -t reads the values, not only the syntax (a bad sync_interval fails), but resolves no
        # route (the routes name compose services and pod DNS names, unknown here): those are
        # checked by `consistency` and by starting each config on loopback (below).
        bad = tmp / "bad.conf"
        bad.write_text(js.conf_text.replace("sync_interval: always", "sync_interval: alway"))
        r = subprocess.run([nats_bin, "-t", "-c", str(bad)], env={**os.environ, "SERVER_NAME": "x"},
                           capture_output=True, text=True)
        check(r.returncode != 0, "nats-server -t refuses a misspelt sync_interval (it checks values, not only syntax)")


def start_cluster(nats_bin, cfg, tmp):
    """Starts one NATS config as a 3-node cluster on loopback: the file as written but for
    store_dir and pid_file (moved into tmp); the addresses by flags (-a 127.0.0.1 and free ports,
    which nats-server lets override the file's; the routes the same nodes on those ports)."""
    nodes = []
    for name, env, client_host in cfg["nodes"]:
        d = tmp / cfg["tag"] / name
        d.mkdir(parents=True)
        text, n = re.subn(r"^(\s*store_dir\s*[:=]\s*).*$", lambda m: m.group(1) + str(d / "store"), cfg["text"], flags=re.M)
        if n != 1:
            raise SystemExit(f"{cfg['label']}: no single store_dir line to move")
        text = re.sub(r"^(\s*pid_file\s*[:=]\s*).*$", lambda m: m.group(1) + str(d / "nats.pid"), text, flags=re.M)
        (d / "nats.conf").write_text(text)
        nodes.append({"name": name, "env": env, "dir": d, "client_host": client_host, "client": free_port(),
                      "cluster": free_port(), "http": free_port()})
    routes = ",".join(f"nats://127.0.0.1:{n['cluster']}" for n in nodes)
    for n in nodes:
        argv = [nats_bin, "-c", str(n["dir"] / "nats.conf"), "-a", "127.0.0.1", "-p", str(n["client"]),
                "-m", str(n["http"]), "--cluster", f"nats://127.0.0.1:{n['cluster']}", "--routes", routes]
        n["log"] = open(n["dir"] / "nats.log", "wb")
        n["proc"] = subprocess.Popen(argv, env={**os.environ, **n["env"]}, stdout=n["log"], stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    for n in nodes:
        status = None
        while time.monotonic() < deadline and n["proc"].poll() is None:
            status, _ = http("GET", f"http://127.0.0.1:{n['http']}/healthz")
            if status == 200:
                break
            time.sleep(0.2)
        n["healthy"] = status == 200
    return nodes


def stop_cluster(cfg, nodes, label):
    """Stops each node as its deployment does: compose's stop_signal, or the k8s preStop command
    (with the pid file moved) and then SIGTERM; each must exit 0 within the stop timeout."""
    for n in nodes:
        p = n["proc"]
        if p.poll() is None:
            t0 = time.monotonic()
            if cfg["prestop"]:
                pre = [a.replace(cfg["conf"].get("pid_file", "\0"), str(n["dir"] / "nats.pid")) for a in cfg["prestop"]]
                nats_bin = p.args[0]
                r = subprocess.run([nats_bin if pre[0] == "nats-server" else pre[0]] + pre[1:], capture_output=True)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and "lame duck" not in (n["dir"] / "nats.log").read_text().lower():
                    time.sleep(0.05)
                check(r.returncode == 0 and "lame duck" in (n["dir"] / "nats.log").read_text().lower(),
                      f"{label}: {n['name']}: the preStop command puts it in lame-duck mode (through its pid_file)")
            p.send_signal(getattr(signal, cfg["signal"]))
            try:
                rc = p.wait(timeout=cfg["timeout"])
            except subprocess.TimeoutExpired:
                rc = None
            took = time.monotonic() - t0
            how = ("preStop " + shlex.join(cfg["prestop"]) + ", then " if cfg["prestop"] else "") + cfg["signal"]
            check(rc == 0, f"{label}: {n['name']} stops on {how}: exit {rc} after {took:.2f}s "
                  f"(allowed {cfg['timeout']:g}s)")
        n["log"].close()


def kill_cluster(nodes):
    for n in nodes:
        if n["proc"].poll() is None:
            n["proc"].kill()
            n["proc"].wait()


def nats_clusters(nats_bin):
    """Each NATS config as a 3-node cluster on loopback."""
    js = JetStream()
    with tempfile.TemporaryDirectory(prefix="tidewire-deploy-check.") as d:
        tmp = Path(d)
        for cfg in js.nats_configs():
            print(f"# {cfg['label']}: 3 nodes on loopback")
            nodes = start_cluster(nats_bin, cfg, tmp)
            try:
                names = [n["name"] for n in nodes]
                for n in nodes:
                    if not check(n["healthy"], f"{n['name']}: /healthz 200 (JetStream current with the meta leader)"):
                        print((n["dir"] / "nats.log").read_text()[-2000:])
                        continue
                    base = f"http://127.0.0.1:{n['http']}"
                    _, varz = get_json(base + "/varz")
                    varz = varz or {}
                    jsc = varz.get("jetstream", {}).get("config", {})
                    check(varz.get("server_name") == n["name"], f"{n['name']}: server_name {varz.get('server_name')}")
                    check(jsc.get("sync_always") is True, f"{n['name']}: JetStream syncs always (varz sync_always)")
                    check(varz.get("cluster", {}).get("name") == cfg["conf"]["cluster"]["name"],
                          f"{n['name']}: in cluster {varz.get('cluster', {}).get('name')}")
                    _, routez = get_json(base + "/routez")
                    peers = sorted({r.get("remote_name") for r in (routez or {}).get("routes", [])})
                    check(peers == sorted(set(names) - {n["name"]}), f"{n['name']}: routes to {peers}")
                    _, jsz = get_json(base + "/jsz")
                    meta = (jsz or {}).get("meta_cluster", {})
                    check(meta.get("cluster_size") == 3 and meta.get("leader") in names,
                          f"{n['name']}: JetStream meta group of {meta.get('cluster_size')}, leader {meta.get('leader')}")
                stop_cluster(cfg, nodes, cfg["tag"])
            finally:
                kill_cluster(nodes)


# ---------------------------------------------------------------- the JetStream mode (gateways)


def start_gateway(name, binary, argv, env, tmp):
    port = free_port()
    data = str(tmp / f"{name}-data")
    argv = [binary] + relocate(argv[1:], port, data)
    print(f"#   {name}: tidewire {shlex.join(argv[1:])}".replace(str(tmp), "$tmp"))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEWIRE_")}
    full_env.update(env)
    full_env.setdefault("RUST_LOG", "warn")
    log = open(tmp / f"{name}.log", "wb")
    p = subprocess.Popen(argv, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    return {"name": name, "proc": p, "base": f"http://127.0.0.1:{port}", "log": log, "path": tmp / f"{name}.log"}


def through_nginx(label, gws, site_text, auth, tmp, first_id):
    """nginx with the compose site (listen and upstreams moved to loopback) in front of the
    gateways: publishes round-robin over both, and SSE (Last-Event-ID), WebSocket (since) and
    long-poll (since) through it see every event once, in id order."""
    import base64 as b64
    port = free_port()
    text = re.sub(r"^(\s*listen\s+)\d+;", rf"\g<1>127.0.0.1:{port};", site_text, flags=re.M)
    ups = iter(g["base"].split("//", 1)[1] for g in gws)
    text = re.sub(r"^(\s*server\s+)tidewire-\d+:\d+;", lambda m: f"{m.group(1)}{next(ups)};", text, flags=re.M)
    d = tmp / f"{label}-nginx"
    d.mkdir()
    (d / "site.conf").write_text(text)
    (d / "nginx.conf").write_text(
        f"daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n"
        f"events {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n"
        + "".join(f"  {k}_temp_path {d}/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + f"  include {d}/site.conf;\n}}\n")
    p = subprocess.Popen(["/usr/sbin/nginx", "-c", str(d / "nginx.conf"), "-p", str(d), "-e", str(d / "error.log")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and http("GET", base + "/healthz")[0] != 200:
            time.sleep(0.1)
        def published(g):
            status, out = http("GET", g["base"] + "/metrics", headers=auth)
            m = re.search(rb"(?m)^tidewire_publish_requests_total (\d+)", out) if status == 200 else None
            return int(m.group(1)) if m else None

        before = [published(g) for g in gws]
        ids = []
        for i in range(4):
            status, out = http("POST", base + "/v1/topics/deploy/nginx/events", json.dumps({"data": i}).encode(),
                               {"content-type": "application/json", **auth})
            ids.append(json.loads(out).get("last_id") if status == 201 else None)
        after = [published(g) for g in gws]
        per = [b - a if None not in (a, b) else None for a, b in zip(before, after)]
        check(None not in ids and ids == sorted(ids) and ids[0] > first_id and None not in per and min(per) > 0,
              f"{label} nginx: 4 publishes get 201, ids {ids}, spread over the gateways {per} "
              "(tidewire_publish_requests_total)")
        want = [i for i in ids if i is not None]

        def raw(request, until, timeout=5):
            """Sends one request over a socket; returns what arrives until until(bytes) or timeout."""
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            s.sendall(request)
            buf, end = b"", time.monotonic() + timeout
            try:
                while time.monotonic() < end and not until(buf):
                    s.settimeout(max(0.05, end - time.monotonic()))
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
            except OSError:
                pass
            s.close()
            return buf

        hdr = "".join(f"{k}: {v}\r\n" for k, v in auth.items())
        sse_ids = lambda b: [int(m) for m in re.findall(rb"(?m)^id:\s*(\d+)\s*$", b)]
        got = raw((f"GET /v1/sse?topic=deploy/nginx HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n"
                   f"Last-Event-ID: {first_id}\r\n{hdr}\r\n").encode(), lambda b: set(want) <= set(sse_ids(b)))
        check(got.startswith(b"HTTP/1.1 200") and sse_ids(got)[:len(want)] == want,
              f"{label} nginx: SSE with Last-Event-ID {first_id} gets {sse_ids(got)} (wanted {want})")

        def ws_ids(b):
            b = b.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in b else b""
            out = []
            while len(b) >= 2:
                n, off = b[1] & 0x7F, 2
                if n == 126:
                    n, off = int.from_bytes(b[2:4], "big"), 4
                elif n == 127:
                    n, off = int.from_bytes(b[2:10], "big"), 10
                if len(b) < off + n:
                    break
                if b[0] & 0x0F == 1:
                    try:
                        out.append(json.loads(b[off:off + n]).get("id"))
                    except ValueError:
                        pass
                b = b[off + n:]
            return [i for i in out if i is not None]

        key = b64.b64encode(os.urandom(16)).decode()
        got = raw((f"GET /v1/ws?topic=deploy/nginx&since={first_id} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                   f"Sec-WebSocket-Protocol: tidewire.v1.json\r\n{hdr}\r\n").encode(),
                  lambda b: set(want) <= set(ws_ids(b)))
        check(got.startswith(b"HTTP/1.1 101") and ws_ids(got)[:len(want)] == want,
              f"{label} nginx: WebSocket upgrade (101) with since={first_id} gets {ws_ids(got)}")
        status, out = http("GET", base + f"/v1/poll?topic=deploy/nginx&since={first_id}&timeout=5", headers=auth)
        pids = [e.get("id") for e in json.loads(out).get("events", [])] if status == 200 else []
        check(pids == want, f"{label} nginx: long-poll since={first_id} gets {pids}")
    finally:
        p.terminate()
        p.wait()


def gateways(label, binary, nats_bin, cfg, gw_argvs, env, tmp, secret, stream, replicas, limits, stop_timeout,
             nginx_site=None):
    """Starts cfg's NATS cluster and the gateways over it, and checks them together (and through
    nginx_site, an nginx site whose upstream lists them, when given)."""
    print(f"# {label}: {len(gw_argvs)} gateways over {cfg['label']} (3 nodes on loopback)")
    nodes = start_cluster(nats_bin, cfg, tmp)
    gws = []
    try:
        if not check(all(n["healthy"] for n in nodes), f"{label}: the NATS cluster is up"):
            return
        # The deployed NATS URLs (host:port of each node) point at the loopback nodes.
        where = {n["client_host"]: f"127.0.0.1:{n['client']}" for n in nodes}

        def moved(s):
            for a, b in where.items():
                s = s.replace(a, b)
            return s

        for i, argv in enumerate(gw_argvs):
            argv = [moved(a) for a in argv]
            conf = flag(argv, "--config")
            if conf:
                path = tmp / f"{label}-{i}.toml"
                path.write_text(moved(Path(conf).read_text()))
                argv[argv.index("--config") + 1] = str(path)
            gws.append(start_gateway(f"{label}-gateway-{i + 1}", binary, argv, env, tmp))
        deadline = time.monotonic() + 60
        for g in gws:
            status = None
            while time.monotonic() < deadline and g["proc"].poll() is None:
                status, _ = http("GET", g["base"] + "/readyz")
                if status == 200:
                    break
                time.sleep(0.2)
            if not check(status == 200, f"{g['name']}: /readyz 200 (connected to NATS, caught up)"):
                g["log"].flush()
                print(g["path"].read_text()[-2000:])
                return
            check(http("GET", g["base"] + "/healthz")[0] == 200, f"{g['name']}: /healthz 200")
        a, b = gws[0], gws[1]
        body = b'{"data":{"t":21.5}}'
        ct = {"content-type": "application/json"}
        url = "/v1/topics/deploy/check/events"
        check(http("POST", a["base"] + url, body, ct)[0] == 401,
              f"{label}: authorization is on (a publish without a token gets 401)")
        token = subprocess.run([binary, "token", "--secret-file", str(secret), "--publish", "deploy/**",
                                "--subscribe", "deploy/**", "--ttl", "5m"], capture_output=True, text=True,
                               check=True).stdout.strip()
        auth = {"authorization": f"Bearer {token}"}

        def publish(base, body):
            """A client's publish: asks again with the same msg_id while the answer is the contract's
            retryable 503 (a stream just created may still be electing its leader)."""
            deadline = time.monotonic() + 30
            while True:
                status, out = http("POST", base + url, body, {**ct, **auth}, timeout=15)
                if status != 503 or time.monotonic() > deadline:
                    return status, out
                time.sleep(0.5)

        body = b'{"data":{"t":21.5},"msg_id":"deploy-check-1"}'
        status, out = publish(a["base"], body)
        check(status == 201, f"{label}: a publish on {a['name']} gets 201 (stored by the stream; got {status} "
                             f"{out[:300]!r})")
        first = json.loads(out).get("last_id") if status == 201 else None
        status, out = http("GET", b["base"] + "/v1/poll?topic=deploy/**&since=0&timeout=5", headers=auth)
        events = json.loads(out).get("events", []) if status == 200 else []
        check(any(e.get("id") == first and e.get("data") == {"t": 21.5} for e in events),
              f"{label}: {b['name']} serves the event {a['name']} stored (id {first})")
        status, out = publish(b["base"], b'{"data":{"t":21.6},"msg_id":"deploy-check-2"}')
        second = json.loads(out).get("last_id") if status == 201 else None
        check(status == 201 and first is not None and second is not None and second > first,
              f"{label}: a publish on {b['name']} gets the next id ({second} > {first})")
        status, out = http("GET", a["base"] + f"/v1/poll?topic=deploy/**&since={first}&timeout=5", headers=auth)
        events = json.loads(out).get("events", []) if status == 200 else []
        check([e.get("id") for e in events][:1] == [second],
              f"{label}: {a['name']} resumes after {first} with {b['name']}'s event ({[e.get('id') for e in events]})")
        if nginx_site is not None and second is not None:
            through_nginx(label, gws, nginx_site, auth, tmp, second)
        _, jsz = get_json(f"http://127.0.0.1:{nodes[0]['http']}/jsz?streams=true&config=true")
        found = [s for acc in (jsz or {}).get("account_details", []) for s in acc.get("stream_detail", [])
                 if s.get("name") == stream]
        sc = found[0].get("config", {}) if found else {}
        check(sc.get("num_replicas") == replicas and sc.get("storage") == "file",
              f"{label}: the stream {stream} is R{sc.get('num_replicas')}, {sc.get('storage')} storage "
              f"(wanted R{replicas}, file)")
        check(sc.get("max_bytes") == limits["max_bytes"] and sc.get("max_age") == limits["max_age_ns"]
              and sc.get("discard") == "old",
              f"{label}: the stream's max_bytes {sc.get('max_bytes')}, max_age {sc.get('max_age')} ns, discard "
              f"{sc.get('discard')} (wanted {limits['max_bytes']}, {limits['max_age_ns']}, old)")
        for g in gws:
            t0 = time.monotonic()
            g["proc"].send_signal(signal.SIGTERM)
            try:
                rc = g["proc"].wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                rc = None
            check(rc == 0, f"{g['name']}: SIGTERM: exit {rc} after {time.monotonic() - t0:.2f}s (allowed {stop_timeout:g}s)")
        stop_cluster(cfg, nodes, label)
    finally:
        for g in gws:
            if g["proc"].poll() is None:
                g["proc"].kill()
                g["proc"].wait()
            g["log"].close()
        kill_cluster(nodes)


def run_jetstream(binary, nats_bin):
    f, js = Facts(), JetStream()
    help_text = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True).stdout
    if not check("--nats-url" in help_text and "--log" in help_text,
                 f"{binary} has the JetStream mode (`serve --help` lists --log and --nats-url)"):
        print("#   the gateways cannot run with this binary: build one with the NATS log backend")
        return
    cfgs = {c["tag"]: c for c in js.nats_configs()}
    age_ns = f.sample["retention_max_age_secs"] * 10**9
    with tempfile.TemporaryDirectory(prefix="tidewire-deploy-check.") as d:
        tmp = Path(d)
        secret = tmp / "jwt-secret"
        secret.write_text(__import__("base64").b64encode(os.urandom(48)).decode() + "\n")

        # compose: each gateway service's command after the image's ENTRYPOINT, its environment.
        first = next(iter(js.gateways.values()))
        argvs = [f.entrypoint + s["command"] for s in js.gateways.values()]
        env = {k: str(v) for k, v in first.get("environment", {}).items()}
        env["TIDEWIRE_JWT_SECRET_FILE"] = str(secret)
        cmd = first["command"]
        gateways("compose", binary, nats_bin, cfgs["compose"], argvs, env, tmp, secret,
                 flag(cmd, "--nats-stream"), int(flag(cmd, "--nats-replicas")),
                 {"max_bytes": int(env["TIDEWIRE_RETENTION_MAX_TOTAL_BYTES"]), "max_age_ns": age_ns},
                 seconds(first["stop_grace_period"]),
                 nginx_site=NGINX_JS.read_text())

        # k8s: the Deployment's args with the ConfigMap's file (JWT path moved), one per replica.
        conf = js.gw_toml_text.replace(js.gw_toml["jwt_secret_file"], str(secret))
        path = tmp / "gateway.toml"
        path.write_text(conf)
        args = list(js.gw_container["args"])
        args[args.index("--config") + 1] = str(path)
        env = {e["name"]: e["value"] for e in js.gw_container.get("env", [])}
        pod = js.deploy["spec"]["template"]["spec"]
        gateways("k8s", binary, nats_bin, cfgs["k8s"], [[f.binary] + args] * js.deploy["spec"]["replicas"], env, tmp,
                 secret, js.gw_toml["nats_stream"], js.gw_toml["nats_replicas"],
                 {"max_bytes": js.gw_toml["retention_max_total_bytes"],
                  "max_age_ns": js.gw_toml.get("retention_max_age_secs", f.sample["retention_max_age_secs"]) * 10**9},
                 float(pod["terminationGracePeriodSeconds"]))


if __name__ == "__main__":
    if sys.argv[1:2] == ["consistency"]:
        consistency()
    elif sys.argv[1:2] == ["run"] and len(sys.argv) == 3:
        run(sys.argv[2])
    elif sys.argv[1:2] == ["nats"] and len(sys.argv) == 3:
        nats_t(sys.argv[2])
        nats_clusters(sys.argv[2])
    elif sys.argv[1:2] == ["run-jetstream"] and len(sys.argv) == 4:
        run_jetstream(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
    if failed:
        print(f"{len(failed)} check(s) failed:")
        for w in failed:
            print("  - " + w)
        sys.exit(1)
