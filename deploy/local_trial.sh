#!/usr/bin/env bash
# Local trial: a coordinator and three hospitals on 127.0.0.1 with synthetic data, TLS and
# SuperNode authentication on, exactly the production commands.
#
#   deploy/local_trial.sh [WORK_DIR] [ROUNDS]       (default /tmp/fedbus-trial, 2 rounds)
#
# Environment: PYTHON (interpreter of the fedbus environment, default `python`),
# FEDBUS_APP_DIR (submit another copy of the Flower app than this repository).
#
# Everything (PKI, keys, state, logs, run folder) goes to WORK_DIR, outside the repository:
# the FAB bundles the app directory. Stops all it started on exit or Ctrl-C.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-/tmp/fedbus-trial}"
ROUNDS="${2:-2}"
PY="${PYTHON:-python}"
BIN="$(dirname "$(command -v "$PY")")"
SITES=(udiat busi bus-uclm)
CENTRES=(SynES1 SynEG SynES2)   # synthetic stand-ins (common/data/synthetic.py)
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

mkdir -p "$WORK"
cd "$WORK"
if [[ ! -f pki/ca.crt ]]; then
  "$PY" "$REPO/deploy/pki.py" ca --out pki >/dev/null
  "$PY" "$REPO/deploy/pki.py" server --ca pki --out pki >/dev/null
fi
PORT="$(free_port)"

{
  echo "host: 127.0.0.1"
  echo "port: $PORT"
  echo "state_dir: coordinator"
  echo "tls: {ca_cert: pki/ca.crt, server_cert: pki/server.pem, server_key: pki/server.key}"
  echo "sites:"
  for s in "${SITES[@]}"; do echo "  $s: keys/$s.pub"; done
} > coordinator.yaml

{
  echo "experiment:"
  echo "  preset: recommended"
  echo "  data: {val_fraction: 0.25}"
  echo "  train: {device: cpu, num_threads: 1}"
  echo "  federation: {rounds: $ROUNDS, local_epochs: 1, min_sites: 3, quorum_timeout_s: 120,"
  echo "               round_timeout_s: 300}"
  echo "sites:"
  for i in "${!SITES[@]}"; do
    echo "  - {name: ${SITES[$i]}, synthetic_centre: ${CENTRES[$i]}, synthetic_n: 16}"
  done
  echo "run_dir: runs/trial-$(date +%Y%m%d-%H%M%S)"
} > experiment.yaml

for i in "${!SITES[@]}"; do
  s="${SITES[$i]}"
  [[ -f "keys/$s" ]] || "$PY" "$REPO/deploy/pki.py" site "$s" --out keys >/dev/null
  cat > "site-$s.yaml" <<EOF
site: $s
superlink: 127.0.0.1:$PORT
ca_cert: pki/ca.crt
private_key: keys/$s
data: {synthetic_centre: ${CENTRES[$i]}, synthetic_n: 16}
state_dir: sites/$s
runtime_port: $(free_port)
device: cpu
num_threads: 1
EOF
done

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

echo "== coordinator on 127.0.0.1:$PORT (work dir $WORK)"
"$BIN/flower-server" --config experiment.yaml --deploy coordinator.yaml --quiet ${FEDBUS_APP_DIR:+--app-dir "$FEDBUS_APP_DIR"} \
  > coordinator.out 2>&1 &
SERVER=$!
PIDS+=("$SERVER")
# Sites need their keys registered: flower-server does it once the SuperLink is healthy.
for _ in $(seq 1 120); do grep -q "registered site bus-uclm\|Run.*submitted\|submitted" coordinator.out 2>/dev/null && break; sleep 0.5; done
for s in "${SITES[@]}"; do
  echo "== site $s"
  "$BIN/flower-client" --site "$s" --config "site-$s.yaml" --quiet > "site-$s.out" 2>&1 &
  PIDS+=("$!")
done

set +e
wait "$SERVER"
CODE=$?
set -e
cat coordinator.out
echo "== flower-server exit status $CODE; run folder: $(grep -o 'run_dir: .*' experiment.yaml)"
echo "== audit log: $WORK/coordinator/audit.jsonl; site logs: $WORK/sites/*/logs"
exit "$CODE"
