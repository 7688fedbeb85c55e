#!/usr/bin/env bash
# Create (or reuse) the MONAI Label virtual environment used by tests/test_monailabel.py and
# docs/monailabel.md. MONAI Label 0.8.5 pulls monai's extras (itk, mlflow, openslide, torchvision,
# sam2, ...; about 7.5 GB with PyPI's torch build), none of which the bundles need, so it lives in its own venv:
#
#   tools/monailabel_env.sh            # -> .venv-monailabel/ (next to requirements-monailabel.txt)
#   MONAILABEL_VENV=/opt/ml tools/monailabel_env.sh
#
# The venv is rebuilt only when requirements-monailabel.txt changes (its hash is stamped inside).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="${MONAILABEL_VENV:-$root/.venv-monailabel}"
# shellcheck source=tools/stamped_venv.sh
source "$root/tools/stamped_venv.sh"
stamped_venv "MONAI Label" "$venv" "$root/requirements-monailabel.txt" "several minutes: ~7.5 GB installed" <<'PY'
import sys
from pathlib import Path

import monai
import monailabel
import torch

app = Path(sys.prefix) / "monailabel" / "sample-apps" / "monaibundle" / "main.py"
if not app.is_file():
    sys.exit(f"monailabel's monaibundle sample app is missing: {app}")
print(f"monailabel {monailabel.__version__}, monai {monai.__version__}, torch {torch.__version__}; app: {app.parent}")
PY
