#!/usr/bin/env bash
# Measures the long-poll and proxy figures against a release server on loopback, each run in a
# fresh data dir:
#   long-poll delivery to 100 pollers at 1000 events/s and to 1000 pollers at 100 events/s
#   (events/s delivered, publish-to-receive p50/p99, polls/s);
#   RSS per idle waiting poller at 10,000 pollers;
#   gzip ratio of a 1000-event poll body of sensor readings (bytes received vs after gunzip);
#   SSE publish-to-receive latency (1000 subscribers x 100 events/s), direct and through the
#   real nginx configured with deploy/nginx.conf (installed with apt-get when missing).
# Usage: bash benches/longpoll.sh [secs-per-run]   (server, nginx and load tool share the cores)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
port=${PORT:-17902}
proxy_port=${PROXY_PORT:-17903}
addr=127.0.0.1:$port
if [ ! -x /usr/sbin/nginx ]; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get install -y -q --no-install-recommends nginx
fi
. benches/lib.sh

nginx_pid=""
start_nginx() {
  ndir=$(mktemp -d /tmp/tidewire-nginx.XXXXXX)
  sed -e "s/127.0.0.1:7700/$addr/" -e "s/listen 127.0.0.1:8080/listen 127.0.0.1:$proxy_port/" \
    deploy/nginx.conf > "$ndir/site.conf"
  cat > "$ndir/nginx.conf" <<CONF
daemon off; master_process off; worker_processes 1; pid $ndir/nginx.pid;
error_log $ndir/error.log warn;
events { worker_connections 8192; }
http { access_log off; client_body_temp_path $ndir/body; proxy_temp_path $ndir/proxy;
  fastcgi_temp_path $ndir/fastcgi; uwsgi_temp_path $ndir/uwsgi; scgi_temp_path $ndir/scgi;
  include $ndir/site.conf; }
CONF
  /usr/sbin/nginx -c "$ndir/nginx.conf" -p "$ndir" -e "$ndir/error.log" &
  nginx_pid=$!
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$proxy_port/readyz" >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "nginx did not become ready" >&2; exit 1
}
stop_nginx() { kill -TERM "$nginx_pid"; wait "$nginx_pid" || true; nginx_pid=""; rm -rf "$ndir"; }
on_exit() { [ -n "$nginx_pid" ] && kill -TERM "$nginx_pid" 2>/dev/null; :; }

start; bench fanout --addr "$addr" --transport poll --subscribers 100 --rate 1000 --duration "$secs"; stop
start; bench fanout --addr "$addr" --transport poll --subscribers 1000 --rate 100 --duration "$secs"; stop
start; bench idle --addr "$addr" --transport poll --subscribers 10000 --pid "$pid" --hold 5 --other-rate 100 --other-duration 5; stop
start
bench resume --addr "$addr" --transport poll --events 1000
bench resume --addr "$addr" --transport poll --events 1000 --gzip
stop
start; bench fanout --addr "$addr" --subscribers 1000 --rate 100 --duration "$secs"; stop
start; start_nginx
# Subscribers through the proxy, publishers straight to the server.
bench fanout --addr "127.0.0.1:$proxy_port" --pub-url "http://$addr/v1/topics/{topic}/events" \
  --subscribers 1000 --rate 100 --duration "$secs"
stop_nginx; stop
