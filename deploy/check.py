#!/usr/bin/env python3
"""Cross-checks of deploy/ and a run of the real binary the way each deployment starts it.

Called by deploy/check.sh (with the virtualenv's Python, which has PyYAML):

    check.py consistency           the files agree with each other and with the code's defaults
    check.py run BINARY            starts BINARY as the image, the StatefulSet and the systemd
                                   unit would (addresses and paths moved to a temp dir and a
                                   loopback port), checks it is ready, that authorization is on,
                                   and that SIGTERM drains and exits 0 in time

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

    print("# TIDEWIRE_* variables")
    texts = {
        "Dockerfile": (DEPLOY / "Dockerfile").read_text(),
        "docker-compose.yml": (DEPLOY / "docker-compose.yml").read_text(),
        "systemd/tidewire.service": (DEPLOY / "systemd" / "tidewire.service").read_text(),
    }
    texts.update({f"k8s/{p.name}": p.read_text() for p in (DEPLOY / "k8s").glob("*.yaml")})
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


def http(method, url, body=None, headers=None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
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


if __name__ == "__main__":
    if sys.argv[1:2] == ["consistency"]:
        consistency()
    elif sys.argv[1:2] == ["run"] and len(sys.argv) == 3:
        run(sys.argv[2])
    else:
        sys.exit(__doc__)
    if failed:
        print(f"{len(failed)} check(s) failed:")
        for w in failed:
            print("  - " + w)
        sys.exit(1)
