#!/usr/bin/env bash
# What can be checked of the Dataflow worker image without a Docker daemon: its requirements install into a fresh
# venv next to premem and `premem --version` runs there.  Minutes and a few GB (torch, apache-beam[gcp]), so a
# script rather than a test.  Without a GPU the CPU build of torch is installed first (as scripts/setup.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "$venv/bin/python" -m pip install -q "torch==2.13.0" \
    || "$venv/bin/python" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
"$venv/bin/python" -m pip install -q -r docker/worker-requirements.txt
"$venv/bin/python" -m pip install -q ".[minilm]"
"$venv/bin/premem" --version
"$venv/bin/python" -c "import apache_beam, torch; print('beam', apache_beam.__version__, 'torch', torch.__version__)"
echo "worker image requirements: ok ($venv)"
