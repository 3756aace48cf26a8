#!/usr/bin/env bash
# Determined runs this in every task container before the entrypoint. Its PyTorch images ship
# torch, torchvision, numpy, pyyaml, pillow and determined itself; this installs only the
# packages the trials need that an image lacks, and pins the image's torch, torchvision and numpy
# so that pip can never reinstall or upgrade them.
set -euo pipefail

declare -A needed=(
  [filelock]="filelock==4.3.2"
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
