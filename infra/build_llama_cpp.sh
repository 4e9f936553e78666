#!/usr/bin/env bash
# Build llama.cpp for GGUF export, its parity tests and the peer benchmark (`make llama-cpp`).
#
# The source is the llama.cpp that llama-cpp-python vendors (pinned in tasks/deploy/llama_cpp.py), taken from PyPI's
# source distribution, so the converter (convert_hf_to_gguf.py), the binaries (llama-server and llama-quantize, which
# trainonce runs; llama-cli and llama-perplexity, for users) and the Python bindings are one version. llama.cpp is compiled once, as shared libraries; llama-cpp-python
# is installed without compiling it again and uses those libraries. Written to a staging folder and renamed
# into place, so an interrupted build never leaves a half-built llama.cpp where trainonce looks for one.
# Usage: infra/build_llama_cpp.sh PYTHON  (the virtual environment's python)
set -euo pipefail
PY=${1:?usage: build_llama_cpp.sh PYTHON}
HOME_DIR=$("$PY" -m tasks.deploy.llama_cpp home)
VERSION=$("$PY" -m tasks.deploy.llama_cpp version)
JOBS=${JOBS:-$(nproc)}
TARGETS="llama-server llama-quantize llama-cli llama-perplexity"

missing() { for target in $TARGETS; do [ -x "$HOME_DIR/build/bin/$target" ] || echo "$target"; done; }
bound() { "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; }

MISSING=$(missing)
if [ -z "$MISSING" ]; then
    echo "llama.cpp (llama-cpp-python $VERSION) already built in $HOME_DIR"
elif [ -f "$HOME_DIR/build/CMakeCache.txt" ]; then
    # A build of fewer targets (an earlier version of this script): add the missing ones in place, reusing every
    # object it compiled. cmake's cache names the staging folder it was configured in, renamed since: a link under
    # that name lets cmake build there again.
    CONFIGURED=$(sed -n 's|^# For build in directory: \(.*\)/build$|\1|p' "$HOME_DIR/build/CMakeCache.txt")
    [ -n "$CONFIGURED" ] || { echo "$HOME_DIR/build/CMakeCache.txt names no build folder" >&2; exit 1; }
    if [ ! "$CONFIGURED" -ef "$HOME_DIR" ]; then
        if [ -e "$CONFIGURED" ]; then
            echo "cannot add $MISSING to $HOME_DIR: its build was configured in $CONFIGURED, which exists" >&2
            exit 1
        fi
        ln -s "$HOME_DIR" "$CONFIGURED"
        trap 'rm -f "$CONFIGURED"' EXIT
    fi
    echo "adding $(echo $MISSING) to the llama.cpp built in $HOME_DIR"
    # shellcheck disable=SC2086  # one target per word
    cmake --build "$CONFIGURED/build" -j "$JOBS" --target $MISSING
else
    STAGE="$HOME_DIR.partial-$$"
    trap 'rm -rf "$STAGE"' EXIT
    mkdir -p "$STAGE"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$STAGE"
    tar -xzf "$STAGE/llama_cpp_python-$VERSION.tar.gz" -C "$STAGE"
    mv "$STAGE/llama_cpp_python-$VERSION/vendor/llama.cpp" "$STAGE/src"
    # Only the library and the four tools (no tests, examples or web UI).
    # $ORIGIN run paths: the binaries find the libraries beside them after the folder is renamed into place.
    cmake -S "$STAGE/src" -B "$STAGE/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON
    # shellcheck disable=SC2086  # one target per word
    cmake --build "$STAGE/build" -j "$JOBS" --target $TARGETS
    rm -rf "$HOME_DIR"
    mv "$STAGE" "$HOME_DIR"
    trap - EXIT
fi

if bound; then
    echo "llama-cpp-python $VERSION already in $PY's environment"
    exit 0
fi
# The bindings without a second compilation; their lib/ folder gets the libraries built above. Built from the
# folder kept beside the build (its vendor/ now empty), so the package is exactly the pinned version.
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install --quiet "$HOME_DIR/llama_cpp_python-$VERSION"
LIB=$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent / 'lib')")
mkdir -p "$LIB"
cp -P "$HOME_DIR"/build/bin/lib*.so* "$LIB/"
"$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'with', llama_cpp.llama_print_system_info().decode())"
echo "llama.cpp built in $HOME_DIR"
