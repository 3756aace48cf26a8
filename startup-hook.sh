#!/usr/bin/env bash
# Determined runs this in every task container before the entrypoint. Its PyTorch images ship
# torch, torchvision and determined, which bring numpy, pillow and filelock with them. This
# installs the other packages the trials import, where an image lacks them. It pins the image's
# torch, torchvision and numpy, so pip cannot reinstall or upgrade them.
set -euo pipefail

declare -A needed=(
  [filelock]="filelock==4.3.2"
  [yaml]="pyyaml==6.0.3"  # run.py reads experiment YAMLs locally
  [tensorboard]="tensorboard==2.21.0"
  [sklearn]="scikit-learn==1.9.1"  # only the digits dataset uses it
)

missing=()
for module in "${!needed[@]}"; do
  python3 -c "import ${module}" 2>/dev/null || missing+=("${needed[$module]}")
done

if ((${#missing[@]} > 0)); then
  constraints=$(mktemp)
  python3 -m pip freeze | grep -i -E '^(torch|torchvision|numpy)==' >"${constraints}" || true
  python3 -m pip install --no-cache-dir --constraint "${constraints}" "${missing[@]}"
  rm -f "${constraints}"
fi
