#!/usr/bin/env bash
# Create (or reuse) the virtual environment of the BraTS challenge's own scorer (BraTS-evaluation 0.0.10 on
# panoptica) used by tools/official_metrics.py, `tools.experiment kdnet --official_metrics` and
# tests/test_official_metrics.py. BraTS-evaluation is AGPL-3.0: it stays in its own venv, is run as a command
# and is never imported by brats_kd or the bundles.
#
#   tools/brats_eval_env.sh            # -> .venv-brats-eval/ (next to requirements-brats-eval.txt)
#   BRATS_EVAL_VENV=/opt/brats-eval tools/brats_eval_env.sh
#
# The venv is rebuilt only when requirements-brats-eval.txt changes (its hash is stamped inside).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="${BRATS_EVAL_VENV:-$root/.venv-brats-eval}"
# shellcheck source=tools/stamped_venv.sh
source "$root/tools/stamped_venv.sh"
# the two commands tools/official_metrics.py runs, and the bundled glioma config it uses
stamped_venv "BraTS-evaluation" "$venv" "$root/requirements-brats-eval.txt" "about 0.9 GB installed" <<'PY'
from importlib.metadata import version

import brats_evaluation.evaluation
import brats_evaluation.metrics_parser
from brats_evaluation import config_path

print(f"BraTS-evaluation {version('BraTS-evaluation')}, panoptica {version('panoptica')}; config: {config_path('gli')}")
PY
