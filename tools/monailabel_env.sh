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
python="${PYTHON:-python3}"
requirements="$root/requirements-monailabel.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"

if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "MONAI Label venv is up to date: $venv"
    exit 0
fi

echo "Creating the MONAI Label venv in $venv (several minutes: ~7.5 GB installed)"
rm -f "$stamp"
"$python" -m venv "$venv"
# never let git see the venv, wherever it is created (Python 3.13's venv does the same)
printf '*\n' > "$venv/.gitignore"
"$venv/bin/pip" install -q -r "$requirements"
"$venv/bin/python" - <<'PY'
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
echo "$want" > "$stamp"
