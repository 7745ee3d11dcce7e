#!/usr/bin/env bash
# Create the isolated environment used by benchmarks/step_time.py (medvlp vs open_clip).
#
# open_clip_torch pulls torchvision, which does not import beside the system's CPU torch, so the
# comparison runs in its own venv at benchmarks/.envs/openclip (git-ignored). Both medvlp
# (editable) and open_clip are installed there so the two models share one torch and can be
# alternated in one process.
#
# Usage (from anywhere):  bash benchmarks/setup_openclip_env.sh
# Override the interpreter with PYTHON=/path/to/python3.11; pass --force to rebuild.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="${REPO_ROOT}/benchmarks/.envs/openclip"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
TORCHVISION_SPEC="${TORCHVISION_SPEC:-torchvision==0.29.1}"

if [[ "${1:-}" == "--force" ]]; then
  rm -rf "${ENV_DIR}"
fi

if [[ -x "${ENV_DIR}/bin/python" ]] && "${ENV_DIR}/bin/python" -c "import open_clip, medvlp" 2>/dev/null; then
  echo "open_clip env already set up at ${ENV_DIR} (pass --force to rebuild)"
  exit 0
fi

echo "[1/4] creating venv at ${ENV_DIR}"
mkdir -p "$(dirname "${ENV_DIR}")"
"${PYTHON}" -m venv "${ENV_DIR}"
PIP=("${ENV_DIR}/bin/python" -m pip install --disable-pip-version-check)

echo "[2/4] installing ${TORCH_SPEC} ${TORCHVISION_SPEC} (large download, a CUDA build that runs on CPU)"
"${PIP[@]}" "${TORCH_SPEC}" "${TORCHVISION_SPEC}"

echo "[3/4] installing open_clip_torch"
"${PIP[@]}" open_clip_torch

echo "[4/4] installing medvlp (editable) from ${REPO_ROOT}"
"${PIP[@]}" -e "${REPO_ROOT}"

"${ENV_DIR}/bin/python" - <<'PY'
import open_clip, torch, torchvision, medvlp
print(f"ok: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"open_clip {open_clip.__version__}, medvlp {getattr(medvlp, '__version__', '?')}")
PY
echo "done: run  ${ENV_DIR}/bin/python benchmarks/step_time.py"
