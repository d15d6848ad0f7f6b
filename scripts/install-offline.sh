#!/usr/bin/env bash
# Install medunic from a wheelhouse (`make wheelhouse`) with no network:
#     bash install-offline.sh WHEELHOUSE PREFIX
# makes PREFIX/venv (the environment) and PREFIX/medunic (the source tree, installed
# editable as `make setup` does). Every file is checked against SHA256SUMS and every wheel
# against requirements.lock; this host's pip settings (indexes, find-links) are ignored, so
# nothing but the wheelhouse can be installed.
set -euo pipefail
USAGE="usage: install-offline.sh WHEELHOUSE PREFIX"
WHEELHOUSE=$(cd "${1:?$USAGE}" && pwd)
PREFIX=${2:?$USAGE}
PY=${PYTHON:-python3}
(cd "$WHEELHOUSE" && sha256sum --quiet -c SHA256SUMS) || { echo "$WHEELHOUSE: SHA256SUMS do not match" >&2; exit 2; }
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT PIP_REQUIREMENT
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
mkdir -p "$PREFIX/medunic"
[ -x "$PREFIX/venv/bin/python" ] || "$PY" -m venv "$PREFIX/venv"
PIP="$PREFIX/venv/bin/python -m pip"
$PIP install --quiet --no-index --find-links "$WHEELHOUSE" --only-binary :all: --require-hashes \
    -r "$WHEELHOUSE/requirements.lock"
tar -xzf "$WHEELHOUSE/medunic-src.tar.gz" -C "$PREFIX/medunic"
$PIP install --quiet --no-index --no-deps --no-build-isolation -e "$PREFIX/medunic"
echo "installed: $("$PREFIX/venv/bin/medunic" --version) in $PREFIX"
echo "app hash (compare with the coordinator's): $("$PREFIX/venv/bin/medunic" client app-hash)"
