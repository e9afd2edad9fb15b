#!/usr/bin/env bash
# The quickstart on a fresh machine: install ftlab in .venv, then fine-tune the embedded tiny model with LoRA.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# constraints.txt pins torch==2.13.0 and a known-good stack (CPU build where it lies on disk, CUDA elsewhere).
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e .
.venv/bin/ftlab train examples/tiny-lora.yaml "$@"
