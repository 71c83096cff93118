#!/usr/bin/env bash
# Local services for the pipeline: Prefect server, the deployments of prefect.yaml, a process
# worker, and an MLflow server over the pipeline's own store (sqlite + local artifacts).
#
#   infra/local/services.sh start    # or: make services
#   infra/local/services.sh stop     # or: make services-stop
#   infra/local/services.sh status
#
# Each service runs in its own session (setsid), its PID in .services/<name>.pid and its log in
# .services/<name>.log. `stop` sends SIGTERM to each process group (background processes here
# ignore SIGINT, and the worker's flow-run children must go with it), then SIGKILL after a grace.
# Ports: PREFECT_PORT (4200), MLFLOW_PORT (5000). Prefect state lives in .prefect/ (PREFECT_HOME).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="${TINYLLAMA_BIN:-$ROOT/.venv/bin}"
RUN_DIR="$ROOT/.services"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
POOL="${PREFECT_POOL:-tinyllama-process}"
GRACE_S="${STOP_GRACE_S:-20}"

export PATH="$BIN:$PATH"
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.prefect}"
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_UI_API_URL="$PREFECT_API_URL"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false  # else the server forks ~3 GB of job workers
MLFLOW_STORE="$ROOT/mlflow"

log() { echo "services: $*"; }

alive() {  # alive NAME: its recorded process still runs
  local pid
  [[ -f "$RUN_DIR/$1.pid" ]] && pid="$(cat "$RUN_DIR/$1.pid")" && kill -0 "$pid" 2>/dev/null
}

launch() {  # launch NAME COMMAND...: start in a new session; the PID is also the process group id
  local name="$1"; shift
  if alive "$name"; then
    log "$name already running (pid $(cat "$RUN_DIR/$name.pid"))"
    return
  fi
  # env --default-signal: a background start inherits SIGINT ignored, and the Prefect worker
  # shuts down by sending itself SIGINT when it gets SIGTERM.
  setsid env --default-signal=INT "$@" >"$RUN_DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$RUN_DIR/$name.pid"
  log "$name started (pid $!, log .services/$name.log)"
}

wait_http() {  # wait_http NAME URL SECONDS
  local name="$1" url="$2" deadline=$((SECONDS + $3))
  until "$BIN/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$url" 2>/dev/null; do
    if ! alive "$name"; then
      log "$name exited during start; last lines of .services/$name.log:"; tail -n 20 "$RUN_DIR/$name.log" >&2; exit 1
    fi
    if ((SECONDS > deadline)); then log "$name not answering at $url after $3 s"; exit 1; fi
    sleep 1
  done
}

stop_one() {  # stop_one NAME: SIGTERM the process group, SIGKILL it after the grace period
  local name="$1" pid deadline
  [[ -f "$RUN_DIR/$name.pid" ]] || return 0
  pid="$(cat "$RUN_DIR/$name.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + GRACE_S))
    while kill -0 -- "-$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
    if kill -0 -- "-$pid" 2>/dev/null; then
      log "$name did not stop in ${GRACE_S} s: SIGKILL"; kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    log "$name stopped (pid $pid)"
  fi
  rm -f "$RUN_DIR/$name.pid"
}

start() {
  mkdir -p "$RUN_DIR" "$PREFECT_HOME" "$MLFLOW_STORE/artifacts"
  cd "$ROOT"
  launch prefect-server "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
  wait_http prefect-server "$PREFECT_API_URL/health" 180
  "$BIN/prefect" work-pool inspect "$POOL" >/dev/null 2>&1 || "$BIN/prefect" work-pool create "$POOL" --type process >/dev/null
  "$BIN/prefect" --no-prompt deploy --all >"$RUN_DIR/deploy.log" 2>&1 || { tail -n 30 "$RUN_DIR/deploy.log" >&2; exit 1; }
  log "deployments registered: $(grep -c "Deployment '" "$RUN_DIR/deploy.log" || true) (log .services/deploy.log)"
  launch prefect-worker "$BIN/prefect" worker start --pool "$POOL" --work-queue default --name "local-$(hostname)"
  launch mlflow-server "$BIN/mlflow" server \
    --backend-store-uri "sqlite:///$MLFLOW_STORE/mlflow.db" --default-artifact-root "$MLFLOW_STORE/artifacts" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
  wait_http mlflow-server "http://127.0.0.1:$MLFLOW_PORT/health" 180
  cat <<EOF

  Prefect UI   http://127.0.0.1:$PREFECT_PORT
  MLflow UI    http://127.0.0.1:$MLFLOW_PORT
  Run it       PREFECT_API_URL=$PREFECT_API_URL $BIN/prefect deployment run tinyllama-pipeline/tiny-cpu --watch
  Stop         infra/local/services.sh stop
EOF
}

stop() {
  # The worker first: it owns running flows; then the servers they report to.
  stop_one prefect-worker
  stop_one mlflow-server
  stop_one prefect-server
}

status() {
  local name
  for name in prefect-server prefect-worker mlflow-server; do
    if alive "$name"; then echo "$name running (pid $(cat "$RUN_DIR/$name.pid"))"; else echo "$name stopped"; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
