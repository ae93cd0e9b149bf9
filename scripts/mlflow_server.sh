#!/usr/bin/env bash
# An MLflow tracking server for many concurrent jobs or several machines: runs and metrics in a
# database, artifacts (checkpoints, overlays) uploaded through the server, so the jobs need no
# shared folder and no database driver. Point every job at it:
#   export MLFLOW_TRACKING_URI=http://<this host>:5000
#
#   scripts/mlflow_server.sh                      # 127.0.0.1:5000, store in ./mlflow-server/
#   MLFLOW_HOST=0.0.0.0 MLFLOW_ALLOWED_HOSTS=gpu-node1,gpu-node2 scripts/mlflow_server.sh
#   MLFLOW_BACKEND_STORE_URI=postgresql://user:pass@db/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://bucket/mlflow scripts/mlflow_server.sh
#
# Settings (environment): MLFLOW_SERVER_DIR (folder of the default store, ./mlflow-server),
# MLFLOW_BACKEND_STORE_URI (default sqlite:///$MLFLOW_SERVER_DIR/mlflow.db; use PostgreSQL or
# MySQL for many writers), MLFLOW_ARTIFACTS_DESTINATION (default $MLFLOW_SERVER_DIR/artifacts),
# MLFLOW_HOST (127.0.0.1: this machine only; 0.0.0.0 for the network), MLFLOW_PORT (5000),
# MLFLOW_WORKERS (4), MLFLOW_SERVER_ENABLE_JOB_EXECUTION (false), MLFLOW_ALLOWED_HOSTS (Host headers accepted besides localhost and
# private IPs). Extra arguments go to `mlflow server` as they are.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mlflow="${MLFLOW:-$root/.venv/bin/mlflow}"
if [[ ! -x "$mlflow" ]]; then
    mlflow="$(command -v mlflow || true)"
fi
if [[ -z "$mlflow" ]]; then
    echo "error: mlflow not found: run 'make venv' in $root first, or set MLFLOW=/path/to/mlflow" >&2
    exit 2
fi

dir="${MLFLOW_SERVER_DIR:-$PWD/mlflow-server}"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$dir/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$dir/artifacts}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-4}"
# MLflow 3's server also starts a pool of job consumers (GenAI evaluation jobs, periodic tasks):
# a dozen processes this project never uses. Off unless asked for.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

if [[ "$backend" == sqlite:///* || "$artifacts" != *://* ]]; then
    mkdir -p "$dir"
fi
if [[ "$artifacts" != *://* ]]; then
    mkdir -p "$artifacts"
fi
args=(
    server
    --backend-store-uri "$backend"
    --artifacts-destination "$artifacts"
    --serve-artifacts
    --host "$host"
    --port "$port"
    --workers "$workers"
)
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
    args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
echo "mlflow server on http://$host:$port (store $backend, artifacts $artifacts)" >&2
echo "jobs: export MLFLOW_TRACKING_URI=http://$host:$port" >&2
exec "$mlflow" "${args[@]}" "$@"
