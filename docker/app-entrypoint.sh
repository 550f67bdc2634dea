#!/bin/sh
# Entry point of the app image: migrate the store to the current schema, then serve.
#   PREFLOOP_DB_URL       the store (default: SQLite under PREFLOOP_DATA_DIR=/data)
#   PREFLOOP_APP_WORKERS  uvicorn worker processes (default 1)
# Any arguments are passed on to `prefloop up` (e.g. --log-level debug).
# `docker run IMAGE prefloop users add ana --role admin` runs that command instead.
set -eu
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
  exec "$@"
fi
prefloop db upgrade
exec prefloop up --host 0.0.0.0 --port 8000 --workers "${PREFLOOP_APP_WORKERS:-1}" "$@"
