#!/usr/bin/env bash
# The MLflow tracking server for a cluster: MLflow's basic-auth app (every request needs a user and password),
# bound to one private address (the head's private IP, or 127.0.0.1 behind an SSH tunnel), never every interface.
#
#   export MLFLOW_AUTH_ADMIN_PASSWORD=...      # from your secret store; creates the admin user on the first start
#   deploy/mlflow-server.sh "$(hostname -I | cut -d' ' -f1)" 5000 /var/lib/mlflow [more `mlflow server` flags]
#
# Environment (never YAML): MLFLOW_AUTH_ADMIN_PASSWORD (first start), MLFLOW_AUTH_ADMIN_USERNAME (default admin),
# MLFLOW_BACKEND_STORE_URI (default sqlite in STATE_DIR), MLFLOW_ARTIFACTS_DESTINATION (default STATE_DIR/artifacts,
# e.g. s3://bucket/mlartifacts: clients upload through the server, with their credentials),
# MLFLOW_FLASK_SERVER_SECRET_KEY (CSRF key of the user sign-up form; a random one per start if unset).
# Clients (stages, `ray job submit` runtime envs) pass MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
set -euo pipefail

if [[ $# -lt 3 ]]; then
    echo "usage: $0 HOST PORT STATE_DIR [mlflow server flags...]" >&2
    exit 2
fi
host=$1 port=$2 state=$3
shift 3
case "$host" in
    "" | 0.0.0.0 | "::" | "[::]" | "*")
        echo "refusing to listen on every interface ($host): give the cluster's private address or 127.0.0.1" >&2
        exit 2 ;;
esac
mkdir -p "$state"
state=$(cd "$state" && pwd)
# The user store and its policy; the admin password comes only from the environment.
cat > "$state/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = sqlite:///$state/basic_auth.db
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# Remember a verified password for 60 s: each check is a deliberately slow hash (scrypt), and trainers log every few
# steps. A changed password or a deleted user may keep working that long on the other server workers.
auth_cache_ttl_seconds = 60
EOF
if [[ ! -f "$state/basic_auth.db" && -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]]; then
    echo "set MLFLOW_AUTH_ADMIN_PASSWORD: the first start creates the admin user with it" >&2
    exit 2
fi
export MLFLOW_AUTH_CONFIG_PATH="$state/basic_auth.ini"
export MLFLOW_FLASK_SERVER_SECRET_KEY="${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
export MLFLOW_BACKEND_STORE_URI="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$state/mlflow.db}"
export MLFLOW_ARTIFACTS_DESTINATION="${MLFLOW_ARTIFACTS_DESTINATION:-$state/artifacts}"
exec mlflow server --app-name basic-auth --host "$host" --port "$port" "$@"
