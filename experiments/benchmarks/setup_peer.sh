#!/usr/bin/env bash
# Creates the PEER virtual environment .venv-peer (git-ignored) with JaxPM 0.1.6, for the
# side-by-side benchmark experiments/benchmarks/run_pm.py. JaxPM is never a dependency of
# lensbench: it lives only in this separate venv.
#
#   bash experiments/benchmarks/setup_peer.sh          # create if missing, (re)install pins
#   PEER_VENV=/some/dir bash experiments/benchmarks/setup_peer.sh
#
# What works (Python 3.11, CPU, pip registries only):
#   * jax/jaxlib 0.6.2: JaxPM 0.1.6 (June 2025) imports jax.experimental.shard_map, which
#     newer jax no longer has; 0.6.2 is the jax of JaxPM 0.1.6's release month.
#   * jaxdecomp 0.2.9 (JaxPM's FFTs go through jaxdecomp.pfft3d; works on one CPU device).
#   * numpy<2.3, diffrax 0.7.0, equinox 0.12.2, lineax 0.0.8, optimistix 0.0.10: releases of
#     the same period (newest equinox/lineax also resolve, but these are the era's).
#   * jax_cosmo 0.1.0 is sdist-only and its build needs setuptools_scm, which fails in pip's
#     isolated build env here: so setuptools<81 + setuptools_scm 8 are installed into the venv
#     first and jax_cosmo is built with --no-build-isolation.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${PEER_VENV:-$ROOT/.venv-peer}"
PY="${PEER_BASE_PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

PINS=(
  "jax==0.6.2" "jaxlib==0.6.2" "numpy<2.3"
  "jaxdecomp==0.2.9"
  "diffrax==0.7.0" "equinox==0.12.2" "lineax==0.0.8" "optimistix==0.0.10"
)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup_peer] creating $VENV with $PY" >&2
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)

# 1) build tools for the jax_cosmo sdist (used with --no-build-isolation below)
"${PIP[@]}" "setuptools<81" "setuptools_scm==8.*" wheel
# 2) jax stack, pinned
"${PIP[@]}" "${PINS[@]}"
# 3) jax_cosmo 0.1.0 from sdist without build isolation
"${PIP[@]}" --no-build-isolation "jax_cosmo==0.1.0" "${PINS[@]}"
# 4) JaxPM itself
"${PIP[@]}" "jaxpm==0.1.6" "${PINS[@]}"

"$VENV/bin/python" -m pip check
"$VENV/bin/python" - <<'EOF'
import jax, jaxpm, jax_cosmo, diffrax, jaxdecomp
from jaxpm.pm import lpt, make_diffrax_ode, pm_forces  # noqa: F401
from jaxpm.painting import cic_paint_dx  # noqa: F401
print(f"[setup_peer] ok: jax {jax.__version__}, diffrax {diffrax.__version__}, "
      f"jaxdecomp {jaxdecomp.__version__ if hasattr(jaxdecomp, '__version__') else '?'}, "
      f"devices {jax.devices()}")
EOF
