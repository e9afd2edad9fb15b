#!/usr/bin/env bash
# The quickstart on a fresh machine: install ftlab (with its notebook extras) into .venv, then run the quickstart
# tutorial headless in a real Jupyter kernel — LoRA on the embedded tiny model — and write it out as one offline
# HTML page with the plan, the label masks, the dashboard's charts and the chat replies.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# constraints.txt pins torch==2.13.0 and a known-good stack (CPU build where it lies on disk, CUDA elsewhere).
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[notebook]"
mkdir -p outputs
.venv/bin/python scripts/render_notebook.py nbs/tutorials/quickstart.ipynb \
  --out outputs/quickstart.html --executed outputs/quickstart.executed.ipynb "$@"
echo "open outputs/quickstart.html in a browser (it works offline); the run itself is in nbs/tutorials/outputs/quickstart/"
