#!/usr/bin/env bash
# The whole test suite on a fresh machine: install the dev extras, check that the exported modules match the
# notebooks, run the notebooks' lesson cells, then pytest (which also executes each tutorial, once, in a real
# Jupyter kernel). Each phase prints how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS; PHASE_START=$SECONDS
phase() { echo "   ($1: $((SECONDS - PHASE_START)) s)"; PHASE_START=$SECONDS; }

echo "== install"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
phase install

echo "== nbdev_export: ftlab/ must match nbs/"
.venv/bin/nbdev_export
if [ -n "$(git status --porcelain -- ftlab)" ]; then
  git status --porcelain -- ftlab; git diff --stat -- ftlab
  echo "ftlab/ is out of sync with nbs/: run nbdev_export and commit the result"; exit 1
fi
phase nbdev_export

echo "== nbdev_test: notebook lessons (the tutorials run once, under pytest)"
.venv/bin/nbdev_test --n_workers 2 --skip_folder_re '^(tutorials|[_.].*)$'
phase nbdev_test

echo "== pytest"
# The browser test needs Debian's chromium; without root it cannot be installed and that test skips
# (CI sets FTLAB_REQUIRE_BROWSER=1, so there it fails instead).
bash scripts/ensure_browser.sh || echo "chromium is not installed: the real-browser test will skip"
# The terminal dashboard's tests drive it in a real pseudo-terminal through tmux (Debian's package; needs root).
command -v tmux >/dev/null || { [ "$(id -u)" -eq 0 ] && apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends tmux >/dev/null 2>&1; } \
  || echo "tmux is not installed: the terminal dashboard's tests will skip"
.venv/bin/python -m pytest --durations=10 "$@"
phase pytest
echo "== all tests passed in $((SECONDS - START)) s"
