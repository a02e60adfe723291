#!/usr/bin/env bash
# Build llama.cpp's native `llama-server` (and `llama-bench` / `llama-batched-bench`, for bench_engine) (continuous batching, --parallel slots) from the
# llama.cpp sources vendored in the llama-cpp-python sdist of the installed version, so both
# llama.cpp servers in the serving benchmark run the same llama.cpp revision. CPU only, native
# instructions (as the llama-cpp-python wheel was built), no web UI, no network at run time.
#
#   bash benchmarks/build_llama_server.sh        # -> benchmarks/.cache/llama-server/bin/llama-server
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
CACHE=benchmarks/.cache
OUT=$CACHE/llama-server
JOBS=${JOBS:-$(nproc)}
mkdir -p "$CACHE" && echo '*' > "$CACHE/.gitignore"
VERSION=${LLAMA_CPP_PYTHON_VERSION:-$("$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)')}
SRC=$CACHE/llama_cpp_python-$VERSION
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
    "$VENV/bin/pip" download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE"
    tar xzf "$CACHE/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
fi
# GGML_NATIVE=ON (-march=native) also turns on llama.cpp's AMX kernels where the CPU lists AMX; on
# this project's VM (a Sapphire Rapids guest) they segfault at the first matmul, so there the ISA is
# spelled out instead: everything -march=native would pick except AMX.
ISA=(-DGGML_NATIVE=ON)
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
    ISA=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
         -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
         -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
fi
cmake -S "$SRC/vendor/llama.cpp" -B "$OUT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    "${ISA[@]}" -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF
cmake --build "$OUT/build" --target llama-server llama-bench llama-batched-bench -j "$JOBS"
mkdir -p "$OUT/bin"
cp "$OUT/build/bin/llama-server" "$OUT/build/bin/llama-bench" "$OUT/build/bin/llama-batched-bench" "$OUT/bin/"
echo "$OUT/bin/llama-server (llama.cpp from llama-cpp-python $VERSION)"
