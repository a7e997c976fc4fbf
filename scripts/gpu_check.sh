#!/usr/bin/env bash
# The GPU check in one command: scripts/gpu_check.sh [gpu_check.py options, e.g. --out DIR].
# With the project's .venv (`make install`) it runs there. Without one, on a machine whose
# python3 already has torch, torchvision and Lightning (a GPU box with no package index), the
# other dependencies come as wheels in .whl/ (gitignored; see README "GPU check"), installed
# into a temporary folder, and src/ goes on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ -x .venv/bin/python ]; then
    exec .venv/bin/python scripts/gpu_check.py "$@"
fi
site="${TMPDIR:-/tmp}/ssd_lightning_site"
if compgen -G ".whl/*" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
        --no-cache-dir --upgrade --target "$site" .whl/*
fi
export PYTHONPATH="$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}"
exec python3 scripts/gpu_check.py "$@"
