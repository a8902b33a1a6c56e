"""lensbench experiments: the command-line front end and the pieces it needs.

``experiments.cli`` is the ``lensbench`` console script, a thin layer over library functions:
``experiments.runs`` (simulate a run file, its P(k)), ``experiments.maps`` (κ map files, their
C_ell against theory), ``experiments.pipeline`` and ``experiments.compare`` (inference stages, the
cached comparison), with ``experiments.jaxsetup`` choosing devices and the compilation cache before
JAX starts. ``experiments.config`` loads and validates experiment configurations (TOML; shipped
ones in ``experiments/configs``); ``experiments.io`` reads and writes run and map files (HDF5);
``experiments.plots`` draws maps and C_ell; ``experiments.progress`` turns the simulator's per-step
callback into a progress bar. ``experiments.benchmarks`` holds the timing harness and its results.

Nothing here imports JAX at import time: the CLI must be able to choose the number of CPU devices
before JAX starts its backends.
"""
