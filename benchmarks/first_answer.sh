#!/usr/bin/env bash
# Seconds from `make run` to the first 200 on POST /v1/loras, on a demo world built from nothing.
# Run it in a checkout whose venv is in place (`make install`), with port 8000 free:
#   bash benchmarks/first_answer.sh [HOME_DIR]
# HOME_DIR (default: a new temporary directory) becomes LORAGEN_HOME and is emptied first.
# It stops the server, and the background build it started, once the first answer has come.
set -euo pipefail
cd "$(dirname "$0")/.."
export LORAGEN_HOME="${1:-$(mktemp -d)}"
rm -rf "${LORAGEN_HOME:?}"/demo
if curl -s -o /dev/null --max-time 2 http://127.0.0.1:8000/healthz; then
  echo "error: something already answers on port 8000; stop it first" >&2
  exit 1
fi
log="$LORAGEN_HOME/make-run.log"
mkdir -p "$LORAGEN_HOME"
start=$(date +%s.%N)
setsid make run >"$log" 2>&1 &
group=$!
trap 'kill -INT -- -"$group" 2>/dev/null || true' EXIT
until [ "$(curl -s -o /dev/null -w '%{http_code}' -X POST http://127.0.0.1:8000/v1/loras \
          -H 'Content-Type: application/json' -d '{"description": "write the letters backwards"}')" = 200 ]; do
  kill -0 "$group" 2>/dev/null || { echo "error: make run exited; see $log" >&2; exit 1; }
  sleep 1
done
python3 - "$start" "$(date +%s.%N)" "$LORAGEN_HOME/demo/EXPERTS.json" "$log" <<'PY'
import json, sys
start, now, experts, log = sys.argv[1:]
stage = json.load(open(experts))["seconds"]
print(f"first answer after {float(now) - float(start):.1f} s (experts stage {stage} s); log: {log}")
PY
