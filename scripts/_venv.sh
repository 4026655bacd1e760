# Sourced by scripts/serve and scripts/test: make .venv and install the project into it (again when
# pyproject.toml changed). Needs only Python >= 3.11 on PATH (or $PYTHON).
set -euo pipefail
PYTHON="${PYTHON:-python3}"
extras="${1:-}"
"$PYTHON" - <<'PY' || { echo "Python >= 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed${extras:+-$extras}"
want="$(cat pyproject.toml | cksum)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
  echo "$want" > "$stamp"
fi
