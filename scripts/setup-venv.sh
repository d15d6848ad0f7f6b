#!/usr/bin/env bash
# Create the virtual environment and install medunic with the right torch build.
#
# - With an NVIDIA GPU: keep a CUDA torch that is already installed, else install the
#   default (CUDA) build from the package index.
# - Without a GPU: torch 2.14.1 + torchvision 0.29.1, taken from this machine's local
#   wheel store when it has one. timm needs a working torchvision, and PyPI's torchvision
#   0.28.0 (the match of the CPU-only torch 2.13.0 wheel) links CUDA libraries that the
#   CPU wheel lacks and fails at import ("operator torchvision::nms does not exist").
# Afterwards torch/torchvision are pinned by a constraints file so that no other package
# can pull a different (multi-GB) build.
set -euo pipefail
VENV=${1:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "[setup] keeping installed torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] GPU found: installing the CUDA build of torch"
    $PIP install -q torch torchvision
else
    echo "[setup] no GPU: installing torch 2.14.1 / torchvision 0.29.1 (runs on CPU)"
    $PIP install -q "torch==2.14.1" "torchvision==0.29.1"
fi
CONSTRAINTS="$VENV/torch-constraints.txt"
"$VENV/bin/python" - > "$CONSTRAINTS" <<'PYEOF'
import torch, torchvision
# public versions only: "2.14.1+cu130" would not match the index's "2.14.1" candidate
print(f"torch=={torch.__version__.split('+')[0]}")
print(f"torchvision=={torchvision.__version__.split('+')[0]}")
PYEOF
$PIP install -q -c "$CONSTRAINTS" -e ".[dev]"
# `source .venv/bin/activate` then sets what every medunic and Flower command here expects:
# offline hubs and wandb, Flower quiet, and no runtime dependency installation (this script
# installed them), so that `flwr run . --stream` runs the app as it is installed.
MARK="# medunic environment"
if ! grep -q "$MARK" "$VENV/bin/activate"; then
    cat >> "$VENV/bin/activate" <<'ACTEOF'
# medunic environment (scripts/setup-venv.sh)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true
export TOKENIZERS_PARALLELISM=false FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
ACTEOF
fi
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, flwr, timm, transformers; print("torch", torch.__version__, "flwr", flwr.__version__, "timm", timm.__version__, "transformers", transformers.__version__)')"
