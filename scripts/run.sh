#!/usr/bin/env bash
# Install prefloop into ./.venv and run the main job on the embedded default (a SQLite file under
# ./prefloop-data): create the store, import the example feedback and tasks, export a TRL
# preference file with its manifest, and print the store's counts.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q -e .

prefloop db upgrade
prefloop import examples/pairwise.jsonl --format pairwise --source examples --on-error skip
prefloop import examples/listwise.jsonl --format listwise --source examples --on-error skip
prefloop import examples/binary.jsonl --format binary --source examples --on-error skip
prefloop import examples/tasks.jsonl --format tasks --source examples
prefloop export --format trl-preference --out prefloop-data/exports/preference.jsonl
prefloop export --format trl-unpaired --pairs-as-unpaired --out prefloop-data/exports/unpaired.jsonl
prefloop stats
