#!/usr/bin/env bash
# The test command: `bash tests/run.sh [pytest args]` from anywhere.
#
# Idempotent. On a fresh Debian/Ubuntu machine (as root, or with sudo) it installs what the tests
# need and is missing: pocketsphinx + its US English model (the real external recognizer behind the
# `command` engine tests) and python3-venv; then it makes a virtualenv in .venv, installs smapd
# with its [test] extra (again only when pyproject.toml changed), and runs pytest with the
# arguments given (default: the whole suite). Exits with pytest's exit code.
#
# Environment: PYTHON (interpreter for the venv, default python3), SMAPD_TEST_MODEL_CACHE (where the
# embedded model is assembled once and reused, default .venv/smapd-model-cache), SMAPD_TEST_LINT=1 (run
# ruff and mypy first, as CI does).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
VENV=$ROOT/.venv
# pocketsphinx: the real external recognizer of the `command` engine tests; systemd, util-linux
# (unshare, nsenter, setpriv), passwd (useradd) and python3-venv (install.sh builds /opt/smapd/venv
# from /usr/bin/python3): the deploy tests under a namespaced systemd; prometheus (for promtool) and
# prometheus-node-exporter: the metrics files checked and scraped by the real tools.
APT_PACKAGES=(pocketsphinx pocketsphinx-en-us systemd util-linux passwd python3-venv prometheus
              prometheus-node-exporter)

say() { printf '[tests/run.sh] %s\n' "$*" >&2; }

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        say "need root (or sudo) to run: $*"
        exit 1
    fi
}

# --- system packages ------------------------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ! command -v "$PYTHON" >/dev/null; then
    missing+=(python3 python3-venv)
    PYTHON=python3
elif [[ ! -x $VENV/bin/python ]] && ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)  # Debian's python3 ships venv's pip bootstrap separately
fi
if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update
    as_root apt-get install -y --no-install-recommends "${missing[@]}"
else
    say "Debian packages present: ${APT_PACKAGES[*]}"
fi

# --- virtualenv and smapd[test] --------------------------------------------------------------
if [[ ! -x $VENV/bin/python ]]; then
    say "creating virtualenv $VENV ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv "$VENV"
fi
stamp=$VENV/.smapd-install-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    say "installing smapd[test] into $VENV (pip install -e '.[test]')"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -e ".[test]"
    echo "$want" > "$stamp"
else
    say "smapd[test] already installed in $VENV (pyproject.toml unchanged)"
fi

# --- lint (CI sets SMAPD_TEST_LINT=1): ruff and mypy, configured in pyproject.toml ----------------
if [[ ${SMAPD_TEST_LINT:-0} == 1 ]]; then
    say "lint: ruff check smapd tests bench testkit; mypy smapd testkit"
    "$VENV/bin/ruff" check smapd tests bench testkit
    "$VENV/bin/mypy" smapd testkit
fi

# --- run ---------------------------------------------------------------------------------------
export SMAPD_TEST_MODEL_CACHE=${SMAPD_TEST_MODEL_CACHE:-$VENV/smapd-model-cache}
say "running: .venv/bin/python -m pytest $* (model cache: $SMAPD_TEST_MODEL_CACHE)"
set +e
"$VENV/bin/python" -m pytest "$@"
status=$?
set -e
say "pytest exited with $status"
exit "$status"
