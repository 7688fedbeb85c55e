# shellcheck shell=bash
# Sourced by tools/monailabel_env.sh and tools/brats_eval_env.sh: a virtual environment that is rebuilt only when
# its requirements file changes (the file's sha256 is stamped inside the venv once the build and its check passed).
#
#   stamped_venv LABEL VENV REQUIREMENTS SIZE_NOTE  < check.py
#
# builds VENV from REQUIREMENTS unless its stamp matches, then runs the Python on stdin with the venv's interpreter
# (it must exit non-zero when the venv is unusable) before stamping. Needs PYTHON (default python3).
stamped_venv() {
    local label="$1" venv="$2" requirements="$3" size_note="$4"
    local stamp="$venv/.requirements.sha256" want
    want="$(sha256sum "$requirements" | cut -d' ' -f1)"
    if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        echo "$label venv is up to date: $venv"
        return 0
    fi
    echo "Creating the $label venv in $venv ($size_note)"
    rm -f "$stamp"
    "${PYTHON:-python3}" -m venv "$venv"
    # never let git see the venv, wherever it is created (Python 3.13's venv does the same)
    printf '*\n' > "$venv/.gitignore"
    "$venv/bin/pip" install -q -r "$requirements"
    "$venv/bin/python" -
    echo "$want" > "$stamp"
}
