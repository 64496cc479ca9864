#!/usr/bin/env bash
# Creates .venv at the checkout's root with Python 3.12 and installs zenjax (editable) with its test
# extras. Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
find_python() {
  for cand in "${PYTHON:-}" python3.12; do
    [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$cand"; return; }
  done
  if command -v pyenv >/dev/null 2>&1; then
    v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$)' | tail -n 1 || true)
    [ -n "$v" ] && { echo "$(pyenv root)/versions/$v/bin/python3.12"; return; }
  fi
  echo "install.sh: Python 3.12 not found (set PYTHON=/path/to/python3.12)" >&2; exit 1
}
if [ ! -x .venv/bin/python ]; then
  py=$(find_python)
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
extras="test"
[ -n "${ZENJAX_EXTRAS:-}" ] && extras="test,${ZENJAX_EXTRAS}"
.venv/bin/python -m pip install -q -e ".[${extras}]"
echo "zenjax installed in .venv ($(.venv/bin/python --version))" >&2
