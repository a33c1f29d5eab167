#!/usr/bin/env bash
# Stop what infra/local/up.sh started (and nothing else): the S3 and MLflow process groups, and
# the Ray processes of this stack's own temp dir. Safe to run twice.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
STATE=${1:-$ROOT/.cache/local-stack}
[ -d "$STATE" ] || { echo "no local stack state at $STATE"; exit 0; }
STATE=$(cd "$STATE" && pwd)

for name in mlflow s3; do
  if [ -f "$STATE/$name.pid" ]; then
    pgid=$(cat "$STATE/$name.pid")
    kill -TERM -- "-$pgid" 2>/dev/null
    for _ in $(seq 1 20); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pgid" 2>/dev/null
    rm -f "$STATE/$name.pid"
  fi
done
# Every process of this Ray cluster names the stack's temp dir on its command line.
if pgrep -f -- "$STATE/ray" >/dev/null; then
  pkill -TERM -f -- "$STATE/ray"
  for _ in $(seq 1 20); do pgrep -f -- "$STATE/ray" >/dev/null || break; sleep 0.5; done
  pkill -KILL -f -- "$STATE/ray"
fi
rm -f "$STATE/env"
echo "local stack down"
