#!/usr/bin/env bash
# Build an offline installer for a site or coordinator on THIS platform (OS, CPU, Python):
# - every wheel medunic needs at run time, at exactly the versions installed in the venv that
#   `make setup` made (torch included), pinned with their SHA-256 in requirements.lock;
# - medunic's own source tree (medunic-src.tar.gz): it is installed as a tree, like
#   `make setup` does, because the site daemon allows the Flower app built from that tree
#   (`medunic client app-hash`), which must equal what the coordinator runs;
# - install-offline.sh and SHA256SUMS of everything.
# Copy the folder to the air-gapped host and run
#     bash WHEELHOUSE/install-offline.sh WHEELHOUSE /opt/medunic
# This needs the package registries once, here; the target host needs none.
set -euo pipefail
VENV=${VENV:-.venv}
OUT=${1:-wheelhouse}
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "no $VENV: run \`make setup\` first" >&2; exit 2; }
export PIP_DISABLE_PIP_VERSION_CHECK=1
rm -rf "$OUT"
mkdir -p "$OUT"
# pin every dependency to what runs here, so the site runs what was tested here
"$PY" -m pip list --format=freeze --exclude-editable > "$OUT/pins.txt"
"$PY" -m pip wheel --quiet --wheel-dir "$OUT" -c "$OUT/pins.txt" . "setuptools>=68" wheel
rm "$OUT/pins.txt" "$OUT"/medunic-*.whl
# the source tree as checked out here (tracked and new files; nothing .gitignore'd)
git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$OUT/medunic-src.tar.gz"
"$PY" - "$OUT" <<'PYEOF'
"""requirements.lock: one pinned requirement per wheel with its SHA-256 (pip --require-hashes)."""
import hashlib, sys
from pathlib import Path
from packaging.utils import parse_wheel_filename

out = Path(sys.argv[1])
lines = []
for wheel in sorted(out.glob("*.whl")):
    name, version, _, _ = parse_wheel_filename(wheel.name)
    lines.append(f"{name}=={version} --hash=sha256:{hashlib.sha256(wheel.read_bytes()).hexdigest()}")
(out / "requirements.lock").write_text("\n".join(lines) + "\n")
print(f"wheelhouse: {len(lines)} wheels, {sum(w.stat().st_size for w in out.glob('*.whl')) / 2**20:.0f} MiB in {out}")
PYEOF
cp scripts/install-offline.sh "$OUT/"
(cd "$OUT" && sha256sum -- * > SHA256SUMS)
echo "on the target host: bash $OUT/install-offline.sh $OUT /opt/medunic"
