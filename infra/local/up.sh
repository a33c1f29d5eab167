#!/usr/bin/env bash
# Bring up the local stack that development, integration tests and the demo share:
#   - an S3-compatible server (moto) on 127.0.0.1 with one bucket,
#   - an MLflow tracking server on SQLite, artifacts proxied into that bucket,
#   - a Ray head (`ray start --head`) with its job server on 127.0.0.1.
# Usage: infra/local/up.sh [STATE_DIR]    (default: .cache/local-stack)
# Writes STATE_DIR/env: `source` it to point ray job submit, MLflow and s3fs at the stack.
# Tear down with infra/local/down.sh [STATE_DIR]: it stops exactly what this script started.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
STATE=$(mkdir -p "${1:-$ROOT/.cache/local-stack}" && cd "${1:-$ROOT/.cache/local-stack}" && pwd)
BIN=${VENV_BIN:-$ROOT/.venv/bin}
BUCKET=${TE_BUCKET:-timeexpert}
RAY_CPUS=${TE_RAY_CPUS:-4}

if [ -f "$STATE/env" ]; then
  echo "local stack already up (state in $STATE); run infra/local/down.sh first" >&2
  exit 1
fi
free_port() { "$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_http() {  # url, seconds
  for _ in $(seq 1 "$2"); do
    "$BIN/python" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" 2>/dev/null && return 0
    sleep 1
  done
  echo "timed out waiting for $1" >&2
  return 1
}

S3_PORT=$(free_port); MLFLOW_PORT=$(free_port); RAY_PORT=$(free_port); DASH_PORT=$(free_port)
# Ray's dashboard agent listens on a fixed 52365 by default: taken by any other Ray instance on
# the machine, the agent never registers and jobs are refused ("No available agent").
AGENT_PORT=$(free_port)
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
export MLFLOW_DISABLE_TELEMETRY=true RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
# Job entrypoints (`python jobs/train.py ...`) run with the head's PATH: the project's venv first.
export PATH="$BIN:$PATH"
# The stack keeps Ray under STATE/ray (--temp-dir); an inherited RAY_TMPDIR or RAY_ADDRESS
# (tests set them) would point Ray's processes elsewhere and the job agent never registers.
unset RAY_TMPDIR RAY_ADDRESS

# Each server gets its own session (setsid) so down.sh can stop its whole process group.
setsid "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"$STATE/s3.log" 2>&1 < /dev/null &
echo $! >"$STATE/s3.pid"
wait_http "$AWS_ENDPOINT_URL" 30
"$BIN/python" - "$BUCKET" <<'PY'
import sys, s3fs
s3fs.S3FileSystem().mkdir(sys.argv[1])
PY

setsid "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
  --backend-store-uri "sqlite:///$STATE/mlflow.db" \
  --artifacts-destination "s3://$BUCKET/mlflow-artifacts" >"$STATE/mlflow.log" 2>&1 < /dev/null &
echo $! >"$STATE/mlflow.pid"

# Ray keeps its sessions under STATE/ray: down.sh finds every Ray process by that path.
"$BIN/ray" start --head --port "$RAY_PORT" --num-cpus "$RAY_CPUS" \
  --temp-dir "$STATE/ray" --include-dashboard true \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" --dashboard-agent-listen-port "$AGENT_PORT" \
  --disable-usage-stats >"$STATE/ray.log" 2>&1
wait_http "http://127.0.0.1:$MLFLOW_PORT/health" 180  # the MLflow server starts in ~10 s idle, over 60 s on a loaded machine
wait_http "http://127.0.0.1:$DASH_PORT/api/version" 60
# The job server answers before the head's job agent has registered ("No available agent to
# submit job"): ready means a (no-op) job is accepted.
deadline=$((SECONDS + 150))
until timeout 30 "$BIN/ray" job submit --address "http://127.0.0.1:$DASH_PORT" --no-wait -- true \
    >"$STATE/ready-probe.log" 2>&1; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "Ray job agent never became ready:" >&2; cat "$STATE/ready-probe.log" >&2; exit 1
  fi
  sleep 1
done

cat >"$STATE/env" <<ENV
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export RAY_ADDRESS=http://127.0.0.1:$DASH_PORT
export TE_RAY_GCS_ADDRESS=127.0.0.1:$RAY_PORT
export TE_STORAGE_ROOT=s3://$BUCKET
export RAY_AUTH_MODE=disabled MLFLOW_DISABLE_TELEMETRY=true
ENV
echo "local stack up: S3 $AWS_ENDPOINT_URL (bucket $BUCKET), MLflow http://127.0.0.1:$MLFLOW_PORT, Ray jobs http://127.0.0.1:$DASH_PORT"
echo "use it: source $STATE/env"
