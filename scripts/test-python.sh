#!/usr/bin/env bash
# The Python binding's tests: builds libcowbackup.so, gets pytest (a venv in .venv, else the
# user's or system's Python), runs python/tests against the built library.
# Works on a fresh Debian machine as root from a clean checkout. Exits non-zero on failure,
# including when pytest collects no tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

# The RBD driver (cargo feature rbd) when librbd and librados are installed (Debian: librbd-dev).
features=()
if [ -f /usr/include/rbd/librbd.h ] && [ -f /usr/include/rados/librados.h ]; then features=(--features rbd); fi
echo "--- cargo build --release --lib ${features[*]}"
cargo build --release --lib "${features[@]}"
export COWBACKUP_LIB="$root/target/release/libcowbackup.so"
test -f "$COWBACKUP_LIB" || { echo "error: $COWBACKUP_LIB was not built" >&2; exit 1; }

have_pytest() { "$1" -c 'import pytest' >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
apt_updated=""
apt_install() {
    command -v apt-get >/dev/null || return 1
    if [ -z "$apt_updated" ]; then as_root apt-get update -q || return 1; apt_updated=1; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

if ! command -v python3 >/dev/null; then
    apt_install python3 python3-venv
fi

python=""
if [ -x .venv/bin/python ] && have_pytest .venv/bin/python; then
    python=.venv/bin/python
else
    if [ ! -x .venv/bin/python ]; then
        echo "--- python3 -m venv .venv"
        if ! python3 -m venv .venv; then
            rm -rf .venv
            # Debian ships venv's ensurepip separately.
            if apt_install python3-venv; then
                python3 -m venv .venv || rm -rf .venv
            fi
        fi
    fi
    if [ -x .venv/bin/python ]; then
        echo "--- pip install pytest (.venv)"
        .venv/bin/python -m pip install -q pytest
        python=.venv/bin/python
    else
        echo "--- no venv: using the system python3"
        python=python3
        if ! have_pytest python3; then
            if ! python3 -m pip --version >/dev/null 2>&1; then
                apt_install python3-pip || true
            fi
            python3 -m pip install -q --user pytest \
                || python3 -m pip install -q --user --break-system-packages pytest \
                || python3 -m pip install -q --break-system-packages pytest \
                || apt_install python3-pytest \
                || true
        fi
    fi
fi
have_pytest "$python" || { echo "error: could not install pytest for $python" >&2; exit 1; }

echo "--- pytest python/tests (COWBACKUP_LIB=$COWBACKUP_LIB)"
set +e
"$python" -m pytest -q python/tests "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
