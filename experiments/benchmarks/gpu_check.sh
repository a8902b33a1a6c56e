#!/usr/bin/env bash
# One prepared GPU check for a short lease (one H100 or H200; ≤ 8 minutes wall in all). Run ONCE,
# from anywhere, with the machine's Python (it needs jax with CUDA, numpyro, h5py, scipy):
#
#     bash experiments/benchmarks/gpu_check.sh "$OUT/gpu_check.json"
#
# It records into that JSON (default ./gpu_check.json; rewritten after every item, so a timeout
# loses only the running item) and prints a short table:
#   env                      nvidia-smi name and memory, jax.devices(), jax/jaxlib versions
#   grads/{quick,lsst_y10_64x64x256,lsst_y10_128x128x1024}/{adjoint,checkpoint}
#                            value-and-gradient: compile, median time, gradients/s, device peak
#                            (peak_bytes_in_use, one subprocess per mode) and bytes per mesh cell
#   vmap/quick               jax.vmap over K = 1, 4, 16 positions: gradients/s against K
#   profile/lsst_y10_128x128x1024
#                            jax.profiler trace of 2 gradients at 128x128x1024: top 10 ops by
#                            device time, XLA cost analysis; the raw trace in <OUT stem>_trace/
#   parts/lsst_y10_128x128x1024
#                            PM force, painting, FFTs, Born projection timed alone
#   hires/lsst_y10_hires     the resolved lightcone (issue 27): forward maps, their C_ell over
#                            theory, the gradient's time and device peak; last, so run it alone:
#                                bash experiments/benchmarks/gpu_check.sh --only hires "$OUT/hires.json"
# Details: the docstring of experiments/benchmarks/gpu_check.py.
#
# Without a GPU it refuses in one line (exit 1). To test the script on CPU (tiny sizes, minutes):
#     bash experiments/benchmarks/gpu_check.sh --cpu-smoke smoke.json
# Other options: --budget S (seconds for all items, default 450), --only NAME,... (a subset).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# The project's venv where there is one (this VM); the machine's own Python on a lent GPU, whose
# copy of the tree has no venv (a CPU-only jaxlib would not see the GPU anyway).
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
# The tree this script is in comes first on the path (not an installed copy); the caller's
# directory stays the working directory, so a relative OUT.json lands where they expect.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# On the GPU, a hard stop 30 s after the Python budget (450 s): whatever happens, the lease is not
# overrun, and the JSON holds every item finished before. The CPU smoke run is no lease: its
# budget (--budget, 10x the GPU one by default there) is the only limit.
if [[ " $* " == *" --cpu-smoke "* ]]; then
  exec "$python" -m experiments.benchmarks.gpu_check "$@"
fi
exec timeout -k 10 "${GPU_CHECK_HARD_LIMIT_S:-480}" "$python" -m experiments.benchmarks.gpu_check "$@"
