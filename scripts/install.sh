#!/usr/bin/env bash
# One install script for CI, `make`, and the container images.
# Usage: scripts/install.sh VENV_DIR [EXTRAS]   e.g. scripts/install.sh .venv train,dev
#        scripts/install.sh VENV_DIR server     (the server alone: no torch)
set -euo pipefail
venv=${1:?usage: install.sh VENV_DIR [EXTRAS]}
extras=${2:-}
here=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if [ -z "$extras" ] || [ "$extras" = "server" ]; then
    spec="$here"
else
    spec="$here[$extras]"
fi
# Editable for development (EDITABLE=1, the Makefile's default); a plain install for images.
if [ "${EDITABLE:-0}" = "1" ]; then
    "$venv/bin/python" -m pip install --quiet -e "$spec"
else
    "$venv/bin/python" -m pip install --quiet "$spec"
fi
