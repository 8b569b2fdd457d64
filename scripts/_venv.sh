# Shared by scripts/test and scripts/run-example: create .venv once, (re)install when
# pyproject.toml changed. Usage: ensure_venv EXTRAS
VENV="${PERSONALIZE_VENV:-.venv}"
ensure_venv() {
    extras="$1"
    python="${PYTHON:-python3}"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating $VENV"
        "$python" -m venv "$VENV"
    fi
    stamp="$VENV/.installed-$extras"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "==> installing personalize-middleware[$extras] into $VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -e ".[$extras]"
        touch "$stamp"
    fi
}
