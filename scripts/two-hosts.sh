#!/usr/bin/env bash
# The farm on two hosts on one machine (issue #14): the second host is a network namespace
# joined by a veth pair on a private /30 (10.213.0.1 here, 10.213.0.2 there), nothing else
# routed. Host 1 runs PostgreSQL, Redis, SeaweedFS's S3, the Ray head, the API, beat and the
# stitch worker, each bound to 10.213.0.1 (Ray's gRPC servers excepted: README, "Two hosts");
# host 2 runs a Ray worker node offering `tier:cpu-remote` and the Celery render worker of
# that tier. Jobs of the project `remote` (model wan-tiny) are routed there.
#
#   sudo scripts/two-hosts.sh up       # start both hosts; prints the API key and what to run
#   sudo scripts/two-hosts.sh cut 20   # host 2 loses its link for 20 s
#   sudo scripts/two-hosts.sh down     # stop everything, remove the namespace and its state
#
# Needs root (ip netns), PostgreSQL's server binaries, redis-server and the project's .venv.
# tests/e2e/test_two_hosts.py builds the same two hosts (tests/two_hosts.py) and checks them.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
NS=farm2h HOST_IF=farm2h-a NS_IF=farm2h-b H1=10.213.0.1 H2=10.213.0.2
STATE=${FARM_TWO_HOSTS_DIR:-/tmp/farm-two-hosts}
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -n 1)
RAY_PORT=6390 PG_PORT=5432 REDIS_PORT=6379 S3_PORT=8333 API_PORT=8000

as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

link_up() {
  ip netns add "$NS"
  ip link add "$HOST_IF" type veth peer name "$NS_IF"
  ip link set "$NS_IF" netns "$NS"
  ip addr add "$H1/30" dev "$HOST_IF" && ip link set "$HOST_IF" up
  ip netns exec "$NS" ip addr add "$H2/30" dev "$NS_IF"
  ip netns exec "$NS" ip link set "$NS_IF" up
  ip netns exec "$NS" ip link set lo up
}

servers_up() {  # PostgreSQL, Redis (AOF, a password) and S3, all on host 1's link address
  mkdir -p "$STATE/pg" "$STATE/redis" "$STATE/s3" && chown postgres "$STATE/pg"
  as_postgres "$PG_BIN/initdb" -D "$STATE/pg/data" -A trust -U postgres >/dev/null
  echo "host all all $H1/30 trust" >> "$STATE/pg/data/pg_hba.conf"
  as_postgres "$PG_BIN/pg_ctl" -D "$STATE/pg/data" -l "$STATE/pg/server.log" -w start \
    -o "-p $PG_PORT -k $STATE/pg -c listen_addresses=$H1" >/dev/null
  REDIS_PASSWORD=$(openssl rand -hex 16)
  redis-server --bind "$H1" --port "$REDIS_PORT" --requirepass "$REDIS_PASSWORD" \
    --appendonly yes --dir "$STATE/redis" --daemonize yes --logfile "$STATE/redis/redis.log"
  S3_KEY=farm S3_SECRET=$(openssl rand -hex 16)
  printf '{"identities":[{"name":"farm","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","Write","List","Tagging"]}]}' \
    "$S3_KEY" "$S3_SECRET" > "$STATE/s3/s3.json"
  setsid "$BIN/weed" server -s3 -dir="$STATE/s3" -ip="$H1" -ip.bind="$H1" -s3.port="$S3_PORT" \
    -s3.config="$STATE/s3/s3.json" -volume.max=16 -master.volumeSizeLimitMB=64 -volume.preStopSeconds=0 \
    >"$STATE/s3/weed.log" 2>&1 </dev/null &
  echo $! > "$STATE/weed.pid"
}

write_env() {  # the one place the multi-host settings live (README, "Two hosts")
  python3 -c 'import secrets; print(secrets.token_hex(32))' > "$STATE/ray-auth-token"
  chmod 600 "$STATE/ray-auth-token"
  cat > "$STATE/common.env" <<EOF
FARM_DATABASE_URL=postgresql+psycopg://postgres@$H1:$PG_PORT/postgres
FARM_BROKER_URL=redis://:$REDIS_PASSWORD@$H1:$REDIS_PORT/0
FARM_RESULT_BACKEND=redis://:$REDIS_PASSWORD@$H1:$REDIS_PORT/1
FARM_STORAGE_URL=s3://farm/videos
FARM_S3_ENDPOINT_URL=http://$H1:$S3_PORT
FARM_S3_KEY=$S3_KEY
FARM_S3_SECRET=$S3_SECRET
FARM_RAY_ADDRESS=$H1:$RAY_PORT
FARM_RAY_HEAD_PORT=$RAY_PORT
FARM_RAY_AUTH_TOKEN_FILE=$STATE/ray-auth-token
FARM_TIERS_FILE=$STATE/tiers.yaml
FARM_RULES_FILE=$STATE/rules.yaml
FARM_MODELS_DIR=$STATE/models
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1
RAY_health_check_failure_threshold=20
EOF
  printf 'FARM_RAY_NODE_IP=%s\nFARM_HOME=%s/host1\nFARM_RAY_TEMP_DIR=%s/ray\n' \
    "$H1" "$STATE" "$STATE" > "$STATE/host1.env"
  printf 'FARM_RAY_NODE_IP=%s\nFARM_HOME=%s/host2\n' "$H2" "$STATE" > "$STATE/host2.env"
  "$BIN/python" - "$STATE" <<'EOF'
import pathlib, sys, yaml
state, config = pathlib.Path(sys.argv[1]), pathlib.Path("scheduler/config")
tiers = yaml.safe_load((config / "tiers.yaml").read_text())
tiers["tiers"]["cpu-remote"] = dict(tiers["tiers"]["cpu"], gpus_per_node=1,
                                    ray_resource="tier:cpu-remote")
rules = yaml.safe_load((config / "rules.yaml").read_text())
rules["rules"].insert(0, {"name": "remote-project", "route": {"tier": "cpu-remote"},
                          "match": {"project": ["remote"], "model": ["wan-tiny"]}})
(state / "tiers.yaml").write_text(yaml.safe_dump(tiers))
(state / "rules.yaml").write_text(yaml.safe_dump(rules))
EOF
}

# `on 1|2 CMD...`: run a farm command on a host, with its settings; `bg`: keep it running in a
# session of its own (its pid in $STATE/NAME.pid, its output in $STATE/NAME.log).
host_cmd() {
  local host=$1; shift
  CMD=(env $(cat "$STATE/common.env" "$STATE/host$host.env" | xargs))
  if [ "$host" = 2 ]; then CMD+=(ip netns exec "$NS"); fi
  CMD+=("$BIN/farm" "$@")
}
on() { host_cmd "$@"; "${CMD[@]}"; }
bg() {
  local host=$1 name=$2; shift 2
  host_cmd "$host" "$@"
  setsid "${CMD[@]}" >"$STATE/$name.log" 2>&1 </dev/null &
  echo $! > "$STATE/$name.pid"
}

wait_s3() {  # S3 answers once its volume server has registered: write until it takes
  for _ in $(seq 1 120); do
    env $(cat "$STATE/common.env" | xargs) "$BIN/python" -c 'import os, s3fs
fs = s3fs.S3FileSystem(key=os.environ["FARM_S3_KEY"], secret=os.environ["FARM_S3_SECRET"],
                       endpoint_url=os.environ["FARM_S3_ENDPOINT_URL"])
fs.mkdir("farm"); fs.pipe_file("farm/probe", b"ok")' 2>/dev/null && return 0
    sleep 0.5
  done
  echo "S3 did not come up: $STATE/s3/weed.log" >&2
  return 1
}

up() {
  if [ -e "$STATE" ]; then echo "$STATE exists: run '$0 down' first" >&2; exit 1; fi
  mkdir -p "$STATE"
  link_up
  servers_up
  write_env
  on 1 models make-tiny "$STATE/models/wan-tiny" >/dev/null
  wait_s3
  on 1 db upgrade
  on 1 ray start --num-cpus 1 --resources '{}'
  on 2 ray start --address "$H1:$RAY_PORT" --num-cpus 2 --resources '{"tier:cpu-remote": 1}'
  bg 1 api api --host "$H1" --port "$API_PORT"
  bg 1 beat beat
  bg 1 stitch worker -Q stitch -c 1 -n "stitch@host1"
  bg 2 render worker -Q render.cpu-remote -c 1 -n "render@host2"
  key=$(on 1 keys create --project remote --name two-hosts | tail -n 1)
  cat <<EOF
Two hosts up; state and logs in $STATE. From host 1:
  export FARM_API_URL=http://$H1:$API_PORT FARM_API_KEY=$key
  $BIN/farm submit "a lantern between two hosts" --model wan-tiny --project remote --frames 17
  $BIN/farm wait JOB_ID; $BIN/farm logs JOB_ID   # segment_rendered ... on Ray node $H2
Cut host 2's link for 20 s: $0 cut 20.   Stop: $0 down.
EOF
}

cut() {
  ip netns exec "$NS" ip link set "$NS_IF" down
  sleep "${1:-20}"
  ip netns exec "$NS" ip link set "$NS_IF" up
}

down() {
  for pidfile in "$STATE"/*.pid; do  # each service's session: it and its children
    if [ -e "$pidfile" ]; then kill -- "-$(cat "$pidfile")" 2>/dev/null || true; fi
  done
  sleep 3  # a moment to stop cleanly; then S3 (its data goes with $STATE) is killed
  if [ -e "$STATE/weed.pid" ]; then kill -9 -- "-$(cat "$STATE/weed.pid")" 2>/dev/null || true; fi
  for pid in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
  # Host 1's Ray: the processes started with this setup's own temp dir, and their children.
  ray_pids=$(pgrep -f -- "$STATE/ray" || true)
  for pid in $ray_pids $(for p in $ray_pids; do pgrep -P "$p" || true; done); do
    kill -9 "$pid" 2>/dev/null || true
  done
  if [ -d "$STATE/pg/data" ]; then
    as_postgres "$PG_BIN/pg_ctl" -D "$STATE/pg/data" -m fast stop >/dev/null || true
  fi
  if [ -f "$STATE/common.env" ]; then
    redis-cli -h "$H1" -p "$REDIS_PORT" --no-auth-warning \
      -a "$(sed -n 's|^FARM_BROKER_URL=redis://:\([^@]*\)@.*|\1|p' "$STATE/common.env")" \
      shutdown nosave >/dev/null 2>&1 || true
  fi
  ip link del "$HOST_IF" 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$STATE"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  cut) cut "${2:-20}" ;;
  *) echo "usage: $0 up|down|cut [seconds]" >&2; exit 2 ;;
esac
