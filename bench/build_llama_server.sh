#!/usr/bin/env bash
# Build llama.cpp's own llama-server and llama-bench from the llama.cpp that the pinned
# llama-cpp-python vendors, so bench/concurrency.py compares rbee with its real peer on the
# very same llama.cpp. Built once per machine (several minutes on 2 cores) into a cache
# outside the repository; later runs print the binary's path at once.
#
#   bench/build_llama_server.sh          # prints the path of llama-server when built
#
# Environment: RBEE_LLAMA_SDIST (the sdist; default ~/.cache/rbee/sdist/llama_cpp_python-
# <pinned version>.tar.gz, fetched with `pip download --no-binary :all: --no-deps` if absent),
# RBEE_LLAMA_SRC (where to extract), JOBS (parallel compile jobs; default: all cores).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/rbee
SDIST=${RBEE_LLAMA_SDIST:-$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz}
SRC=${RBEE_LLAMA_SRC:-$CACHE/llama.cpp-$VERSION}
BUILD=$SRC/build
JOBS=${JOBS:-$(nproc)}
SERVER=$BUILD/bin/llama-server

if [[ -x $SERVER && -x $BUILD/bin/llama-bench ]]; then
    echo "$SERVER"
    exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.llama-server-build.lock"   # one build per machine at a time
flock 9

if [[ ! -f $SDIST ]]; then
    mkdir -p "$(dirname "$SDIST")"
    echo "==> downloading the llama-cpp-python $VERSION sdist" >&2
    python3 -m pip download --quiet --no-binary :all: --no-deps \
        "llama-cpp-python==$VERSION" -d "$(dirname "$SDIST")"
fi
if [[ ! -f $SRC/CMakeLists.txt ]]; then
    echo "==> extracting llama.cpp from $SDIST to $SRC" >&2
    tmp=$(mktemp -d "$CACHE/.llama-src.XXXXXX")
    tar xzf "$SDIST" -C "$tmp" "llama_cpp_python-$VERSION/vendor/llama.cpp"
    rm -rf "$SRC"
    mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$SRC"
    rm -rf "$tmp"
fi

echo "==> building llama-server and llama-bench in $BUILD (several minutes)" >&2
# No web UI download (there is no network for it, and the bench needs none), no curl,
# RPC on like the wheel dev.sh builds, Release like pip's build.
cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_RPC=on \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$BUILD" --config Release -j "$JOBS" --target llama-server llama-bench >&2
echo "$SERVER"
