#!/usr/bin/env bash
# DeepSpeed ZeRO for real, through `ftlab train --num-processes 2` on this machine: ZeRO-2 and ZeRO-3 SFT with LoRA
# (the same losses as one process with the same batch by accumulation), a ZeRO-3 resume on both ranks, axolotl's
# zero2.json (optimizer state offloaded to CPU), a DPO full fine-tune whose reference copy ZeRO-3 partitions, and the
# mistakes said before any worker starts. deepspeed is not a dependency of ftlab, so it never goes into the venv:
# this script installs it into .deepspeed/site (with DS_BUILD_OPS=0: DeepSpeed compiles the few ops it needs on first
# use, cached in .deepspeed/torch_extensions) and puts that folder on PYTHONPATH for tests/with_deepspeed, which the
# main suite leaves out.
#   bash scripts/test_deepspeed.sh                 # with .venv/bin/python (scripts/test.sh makes it)
#   FTLAB_PYTHON=path/to/python bash scripts/test_deepspeed.sh -k zero3     # another Python; extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${FTLAB_PYTHON:-.venv/bin/python}
DIR=${FTLAB_DEEPSPEED_DIR:-.deepspeed}
PKG=${FTLAB_DEEPSPEED_PACKAGE:-deepspeed==0.19.8}
SITE="$DIR/site"
start=$(date +%s)

# Only deepspeed and the few packages it needs that ftlab's stack lacks go into the folder (--no-deps): torch,
# numpy, pydantic, psutil, packaging and tqdm are the venv's, so torch stays the one constraints.txt pins.
stamp="$DIR/.installed"
want="$PKG $(cat constraints.txt "$0" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing $PKG into $SITE"
  rm -rf "$SITE"; mkdir -p "$SITE"
  # (grep drops pip's notes about local index folders that lack a package: they are not errors)
  DS_BUILD_OPS=0 "$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$SITE" -c constraints.txt \
    "$PKG" einops hjson msgpack ninja py-cpuinfo 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
  echo "$want" > "$stamp"
  echo "   installed in $(( $(date +%s) - start )) s"
fi
export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/$DIR/torch_extensions}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import deepspeed, torch, transformers, accelerate; print(f'deepspeed {deepspeed.__version__} · torch {torch.__version__} · transformers {transformers.__version__} · accelerate {accelerate.__version__}')" 2>&1 \
  | grep -v "Setting accelerator to CPU"
t0=$(date +%s)
rc=0
"$PY" -m pytest tests/with_deepspeed -p no:cacheprovider -o addopts="" -v -s --durations=0 "$@" || rc=$?
echo "== tests/with_deepspeed: $(( $(date +%s) - t0 )) s (whole script $(( $(date +%s) - start )) s)"
exit $rc
