#!/usr/bin/env bash
# Build llama.cpp for GGUF export, its parity tests and the peer benchmark (`make llama-cpp`).
#
# The source is the llama.cpp that llama-cpp-python vendors (pinned in tasks/deploy/llama_cpp.py), taken from PyPI's
# source distribution, so the converter (convert_hf_to_gguf.py), the binaries (llama-server, llama-quantize)
# and the Python bindings are one version. llama.cpp is compiled once, as shared libraries; llama-cpp-python
# is installed without compiling it again and uses those libraries. Written to a staging folder and renamed
# into place, so an interrupted build never leaves a half-built llama.cpp where trainonce looks for one.
# Usage: infra/build_llama_cpp.sh PYTHON  (the virtual environment's python)
set -euo pipefail
PY=${1:?usage: build_llama_cpp.sh PYTHON}
HOME_DIR=$("$PY" -m tasks.deploy.llama_cpp home)
VERSION=$("$PY" -m tasks.deploy.llama_cpp version)
JOBS=${JOBS:-$(nproc)}

built() { [ -x "$HOME_DIR/build/bin/llama-server" ] && [ -x "$HOME_DIR/build/bin/llama-quantize" ]; }
bound() { "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; }

if built; then
    echo "llama.cpp (llama-cpp-python $VERSION) already built in $HOME_DIR"
else
    STAGE="$HOME_DIR.partial-$$"
    trap 'rm -rf "$STAGE"' EXIT
    mkdir -p "$STAGE"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$STAGE"
    tar -xzf "$STAGE/llama_cpp_python-$VERSION.tar.gz" -C "$STAGE"
    mv "$STAGE/llama_cpp_python-$VERSION/vendor/llama.cpp" "$STAGE/src"
    # Only what trainonce uses: the library, llama-server and llama-quantize (no tests, examples or web UI).
    # $ORIGIN run paths: the binaries find the libraries beside them after the folder is renamed into place.
    cmake -S "$STAGE/src" -B "$STAGE/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON
    cmake --build "$STAGE/build" -j "$JOBS" --target llama-server llama-quantize
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
