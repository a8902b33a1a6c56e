"""One prepared GPU check of the field-level gradient, for a single short lease (≤ 8 minutes).

    experiments/benchmarks/gpu_check.sh [OUT.json]              # on the lent GPU, once
    experiments/benchmarks/gpu_check.sh --cpu-smoke smoke.json  # tiny sizes on CPU: tests the script
    python -m experiments.benchmarks.gpu_check [--cpu-smoke] [--budget S] [--only NAME,...] [OUT.json]

OUT.json (default ``gpu_check.json``) is rewritten after every item, so a timeout loses only the
item that was running; items not yet run stay ``"pending"``. Items, smallest first:

  ``env``                 GPU name and memory (``nvidia-smi --query-gpu=name,memory.total``),
                          ``jax.devices()``, backend, jax / jaxlib / numpyro versions, git commit.
  ``grads/<cfg>/<mode>``  value-and-gradient of the field-level log-density (``hmc.measure_gradient``,
                          one subprocess per mode so that each device peak belongs to one mode):
                          compile + first call, median seconds per gradient, the device's
                          ``peak_bytes_in_use`` and bytes per mesh cell, for quick (24×24×48) and
                          lsst_y10 at 64×64×256 and 128×128×1024, modes adjoint and checkpoint.
  ``vmap/quick``          ``jax.vmap`` of quick's value-and-gradient over K = 1, 4, 16 stacked
                          positions: gradients per second against K, i.e. how many chains one GPU
                          serves before it is busy.
  ``profile/<mesh>``      a ``jax.profiler`` trace of 2 gradient calls at 128×128×1024 (adjoint),
                          summarised to the 10 ops with the most device time (parsed with jaxlib's
                          own ``jax.profiler.ProfileData``), with XLA's cost and memory analysis of
                          the compiled gradient; the raw ``*.xplane.pb`` is copied next to OUT.json
                          (``<OUT stem>_trace/``) when under 64 MB, for offline reading.
  ``parts/<mesh>``        the sub-programs of one PM step timed alone at that mesh (forward and
                          gradient): CIC painting, the PM force, the FFTs, the Born projection of
                          one step's shell; a cross-check of the trace and the fallback if it could
                          not be parsed.
  ``hires/lsst_y10_hires``  the resolved lightcone of issue 27 (five shell boxes, 144.5M cells):
                          noise-free maps of seed 0 as one compiled program (compile + first,
                          second call), their auto-spectra over raw Limber + halofit per [cl]
                          bin, then the value and gradient of Σκ² in (Ω_c, every shell's white
                          noise): time, device peak and bytes per cell. Last in the plan, so a
                          full run usually skips it: run it alone with ``--only hires`` (about
                          4-6 minutes expected on an H100, a projection from CPU timings).

Without a GPU the check refuses in one line (exit 1); ``--cpu-smoke`` runs every item on CPU at
tiny sizes (quick at 8×8×16, lsst_y10 at 16×16×64 and 16×16×128 with 32² pixels, K = 1, 4), which
is how the script is tested: on the project's shared 2-core VM each item is a few minutes of XLA
compiling (the vmap, profile and parts items took 330, 178 and 72 s, a quick gradient 180 s), so
the whole smoke run takes about half an hour there; ``--only`` runs a subset.

Budget: every item runs under its own timeout, clipped to what is left of ``--budget`` (default
450 s, 4500 s with ``--cpu-smoke``; on the GPU the shell script adds a hard 480 s limit around
it). Children get ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (as in NOTEBOOK 7i, so that a process
holds only what it uses) and a fresh persistent compilation cache shared by the items: the model's
tables, and the profile's gradient (the same program as ``grads/lsst_y10_128x128x1024/adjoint``),
are compiled once; every ``grads`` and ``vmap`` program is distinct, so their compile times are
first compiles. Expected on an H200 (NOTEBOOK 7i: compiles of 13-23 s, 3.9 s per gradient at
128×128×1024): about 7 minutes in all, the last item the one at risk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

NO_GPU = ("gpu_check: no GPU found (jax backend {backend!r}); use --cpu-smoke to test the script "
          "on CPU")
DEFAULT_BUDGET_S = 450.0  # the shell script's hard limit is 480 s: 30 s for start-up and the table
MIN_ITEM_S = 15.0  # below this an item cannot even import JAX and build the model: skip it
TRACE_COPY_LIMIT = 64 * 2**20  # bytes; larger traces stay in the temp dir (the lease copies $OUT back)
TOP_OPS = 10

# Keys every finished item of a kind must have (the test checks a smoke run against these).
KEYS = {
    "env": ("backend", "devices", "jax_version", "jaxlib_version", "nvidia_smi", "python"),
    "grads": ("config", "mesh_shape", "gradient", "compile_plus_first_s",
              "median_seconds_per_gradient", "gradients_per_s", "device_peak_bytes",
              "device_bytes_per_mesh_cell", "peak_rss_mb", "mesh_cells", "backend"),
    "vmap": ("config", "mesh_shape", "gradient", "batches"),
    "profile": ("config", "mesh_shape", "gradient", "compile_s", "cost", "memory",
                "traced_calls", "seconds_per_call", "top_ops", "trace"),
    "parts": ("config", "mesh_shape", "n_steps", "parts"),
    "hires": ("config", "mesh_cells", "largest_shell_cells", "n_steps", "backend",
              "forward_compile_plus_first_s", "forward_s", "cl", "gradient_compile_plus_first_s",
              "gradient_s", "device_peak_bytes", "device_bytes_per_cell", "peak_rss_mb"),
}
BATCH_KEYS = ("K", "compile_plus_first_s", "median_seconds", "gradients_per_s",
              "speedup_over_K1", "device_peak_bytes")


@dataclass
class Item:
    name: str
    kind: str
    timeout_s: float
    spec: dict = field(default_factory=dict)


def plan(smoke: bool) -> list[Item]:
    """The items, smallest first. At 128×128×1024 the profile comes before the checkpoint mode:
    the checkpointed gradient's cost there is known (NOTEBOOK 7i: 0.255 /s, 20.8 GB), where its
    time goes is not, so an overrun should lose the former."""
    if smoke:  # tiny sizes: each item is a compile or two on CPU (about a minute on 2 busy cores)
        quick, lsst = "8,8,16", ["16,16,64", "16,16,128"]
        quick_changes, lsst_changes = {}, {"maps.npix": 32}
        ks, evals = [1, 4], {"quick": 2, "lsst": 1, "vmap": 2, "trace": 1}
        scale = 10.0  # generous: CPU compiles are slow, and the test machine may be shared
    else:
        quick, lsst = None, ["64,64,256", "128,128,1024"]
        quick_changes, lsst_changes = {}, {}
        ks, evals = [1, 4, 16], {"quick": 50, "lsst": 10, "vmap": 10, "trace": 2}
        scale = 1.0
    small, large = lsst
    tag = {m: "lsst_y10_" + m.replace(",", "x") for m in lsst}  # e.g. lsst_y10_128x128x1024

    def grads(cfg, mesh, changes, mode, n, t):
        name = f"grads/{cfg if cfg == 'quick' else tag[mesh]}/{mode}"
        return Item(name, "grads", t * scale, dict(config=cfg, mesh=mesh, gradient=mode, evals=n,
                                                   changes=changes))

    big_evals = 1 if smoke else 3  # 3.9 s per gradient on an H200 (NOTEBOOK 7i)
    spec_big = dict(config="lsst_y10", mesh=large, gradient="adjoint", changes=lsst_changes)
    return [
        Item("env", "env", 60 * scale),
        grads("quick", quick, quick_changes, "adjoint", evals["quick"], 90),
        grads("quick", quick, quick_changes, "checkpoint", evals["quick"], 90),
        Item("vmap/quick", "vmap", 150 * scale, dict(config="quick", mesh=quick, gradient="adjoint",
                                                     changes=quick_changes, ks=ks,
                                                     evals=evals["vmap"])),
        grads("lsst_y10", small, lsst_changes, "adjoint", evals["lsst"], 90),
        grads("lsst_y10", small, lsst_changes, "checkpoint", evals["lsst"], 90),
        grads("lsst_y10", large, lsst_changes, "adjoint", big_evals, 120),
        Item(f"profile/{tag[large]}", "profile", 120 * scale, dict(spec_big, calls=evals["trace"])),
        grads("lsst_y10", large, lsst_changes, "checkpoint", big_evals, 120),
        Item(f"parts/{tag[large]}", "parts", 90 * scale, dict(spec_big, evals=3)),
        Item("hires/lsst_y10_hires", "hires", 420 * (1.0 if not smoke else 2.0),
             dict(config="hires_patch", changes=HIRES_SMOKE, evals=1) if smoke
             else dict(config="lsst_y10_hires", changes={}, evals=2)),
    ]


# hires on CPU: hires_patch's shells with cells 8x coarser, 3 steps, 16² pixels (a few minutes)
HIRES_SMOKE = {"shells.cell": [4.0, 6.0, 8.8, 13.6, 20.8], "simulation.n_steps": 3,
               "maps.npix": 16}


# ------------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one JSON line per finished stage (the last
# complete line is the result, so a timeout keeps what was measured before it).


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _median_time(fn, args, evals: int) -> float:
    import jax
    import numpy as np

    times = []
    for _ in range(evals):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def work_env(spec: dict) -> dict:
    import platform

    import jax
    import jaxlib

    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv"],
                             capture_output=True, text=True, timeout=30)
        nvidia = smi.stdout.strip() if smi.returncode == 0 else f"error: {smi.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as e:  # no driver: a CPU machine
        nvidia = f"unavailable: {e}"
    try:
        root = str(Path(__file__).resolve().parents[2])
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None  # the device machine's copy of the tree may have no git
    versions = {}
    for pkg in ("numpyro", "blackjax", "numpy", "scipy", "h5py"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except Exception as e:  # reported, not fatal: the measurement items will say more
            versions[pkg] = f"missing: {e}"
    return {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
            "jaxlib_version": jaxlib.__version__, "nvidia_smi": nvidia,
            "python": platform.python_version(), "packages": versions, "git_commit": commit,
            "xla_env": {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_"))}}


def work_grads(spec: dict) -> dict:
    from experiments.benchmarks.hmc import measure_gradient

    return measure_gradient(spec["config"], spec["mesh"], spec["gradient"], spec["evals"],
                            spec.get("changes"))


def _built(spec: dict):
    import simulators

    simulators.enable_x64()
    from experiments.benchmarks.hmc import build_log_density

    return build_log_density(spec["config"], spec["mesh"], spec["gradient"], spec.get("changes"))


def _head(spec: dict, cfg) -> dict:
    return {"config": spec["config"], "mesh_shape": list(cfg.simulation.mesh_shape),
            "gradient": spec["gradient"], "n_steps": cfg.simulation.n_steps}


def work_vmap(spec: dict) -> dict:
    """K positions with K different fields, stacked along a new leading axis, one jit(vmap) call:
    what K chains in lockstep on one GPU cost (NUTS chains would diverge in tree depth; this is
    the throughput bound for K chains, not a sampler measurement)."""
    import jax
    import jax.numpy as jnp

    from experiments.benchmarks.hmc import device_peak_bytes

    cfg, model, prior, ld, _ = _built(spec)
    fn = jax.jit(jax.vmap(ld.value_and_grad))
    out = dict(_head(spec, cfg), batches=[])
    for k in spec["ks"]:
        keys = jax.random.split(jax.random.PRNGKey(1), k)
        pos = jax.tree.map(lambda *xs: jnp.stack(xs), *[ld.init_position(key) for key in keys])
        t0 = time.perf_counter()
        jax.block_until_ready(fn(pos))
        compile_s = time.perf_counter() - t0
        median = _median_time(fn, (pos,), spec["evals"])
        base = out["batches"][0]["gradients_per_s"] if out["batches"] else None
        rate = k / median
        # the peak is per process and never reset: K grows, so it is K's own peak as long as
        # memory grows with K (it does: the batch multiplies every field)
        out["batches"].append({"K": k, "compile_plus_first_s": compile_s, "median_seconds": median,
                               "gradients_per_s": rate,
                               "speedup_over_K1": None if base is None else rate / base,
                               "device_peak_bytes": device_peak_bytes()})
        _emit(out)
    return out


def _short(value, n: int = 160):
    return value if not isinstance(value, str) or len(value) <= n else value[:n] + "…"


def _exclusive(found: list) -> list:
    """(name, start, duration, stats) events of one line → (name, exclusive duration, stats): a
    span that contains others (a CPU ``while`` thunk around its body's thunks) keeps only its own
    time, so that nothing is counted twice."""
    order = sorted(range(len(found)), key=lambda i: (found[i][1], -found[i][2]))
    own = [float(ev[2]) for ev in found]
    stack = []  # (end, index) of the spans open at the current start
    for i in order:
        start, dur = found[i][1], found[i][2]
        while stack and stack[-1][0] <= start:
            stack.pop()
        if stack:
            own[stack[-1][1]] -= dur
        stack.append((start + dur, i))
    return [(ev[0], max(own[i], 0.0), ev[3]) for i, ev in enumerate(found)]


def summarize_trace(path: str | Path, calls: int, top: int = TOP_OPS) -> dict:
    """The ``top`` ops by total duration in a ``*.xplane.pb``, per traced call.

    On a GPU the device planes (``/device:GPU:N``) hold the kernels: an ``XLA Ops`` line if the
    profiler wrote one (one event per HLO op), else kernel events on the stream lines, each named
    by its HLO op in an ``hlo_op`` stat (a fusion may launch several kernels: they add up under
    its name). On CPU (the smoke run) the host plane's thunk events carry the same ``hlo_op``.
    Per op: total ms per call, share of all op time, launches per call, the HLO category if the
    profiler gave one, and the op's name stack (``tf_op``: which JAX function it came from)."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(str(path))
    planes = list(data.planes)
    device = [p for p in planes if p.name.startswith("/device:") and "CPU" not in p.name]
    events = []  # (op name, duration ns, stats)
    source = None
    for plane in device:
        lines = list(plane.lines)
        ops_lines = [ln for ln in lines if ln.name == "XLA Ops"]
        if ops_lines:
            source = "device XLA Ops line"
            events += _exclusive([(e.name, e.start_ns, e.duration_ns, dict(e.stats))
                                  for ln in ops_lines for e in ln.events])
            continue
        for ln in lines:
            if ln.name in ("XLA Modules", "Steps", "Framework Ops", "Source code"):
                continue  # spans that contain the ops: counting them too would double the time
            found = []
            for e in ln.events:
                stats = dict(e.stats)
                # the HLO op a kernel belongs to: "hlo_op" if the tracer parsed its annotation,
                # else the raw annotation, else the kernel's own name (untested on this jaxlib's
                # GPU tracer: hence the fallbacks, and ``stat_names`` below to tell which held)
                key = next((k for k in ("hlo_op", "kernel_annotation") if stats.get(k)), None)
                source = source or (f"device kernels by {key}" if key else "device kernel names")
                found.append((str(stats[key]) if key else e.name, e.start_ns, e.duration_ns, stats))
            events += _exclusive(found)
    if not events:  # CPU: thunks on the host plane
        for plane in planes:
            if plane.name.startswith("/host:"):
                for ln in plane.lines:
                    found = []
                    for e in ln.events:
                        stats = dict(e.stats)
                        if "hlo_op" in stats and not e.name.startswith("end:"):
                            source = "host thunks by hlo_op"
                            found.append((stats["hlo_op"], e.start_ns, e.duration_ns, stats))
                    events += _exclusive(found)
    layout = {p.name: {ln.name: sum(1 for _ in ln.events) for ln in p.lines} for p in planes}
    if not events:
        raise ValueError(f"no op events in {Path(path).name}; planes and lines: {layout}")
    ops: dict[str, dict] = {}
    for name, ns, stats in events:
        op = ops.setdefault(name, {"op": name, "ns": 0.0, "count": 0,
                                   "category": stats.get("hlo_category"),
                                   "tf_op": stats.get("tf_op") or stats.get("long_name")})
        op["ns"] += ns
        op["count"] += 1
    total = sum(o["ns"] for o in ops.values())
    ranked = sorted(ops.values(), key=lambda o: -o["ns"])
    categories: dict[str, float] = {}
    for o in ops.values():  # without a category, the op's name without its ".N" suffix
        key = o["category"] or o["op"].split(".")[0]
        categories[key] = categories.get(key, 0.0) + o["ns"]
    stat_names = sorted({k for _, _, st in events[:200] for k in st})
    return {"parser": "jax.profiler.ProfileData", "source": source, "stat_names": stat_names,
            "layout": {p: lines for p, lines in layout.items() if lines},
            "device_planes": [p.name for p in device], "n_ops": len(ops), "n_events": len(events),
            "op_ms_per_call": total / 1e6 / calls,
            "top_ops": [{"op": o["op"], "ms_per_call": o["ns"] / 1e6 / calls,
                         "fraction": o["ns"] / total, "launches_per_call": o["count"] / calls,
                         "category": o["category"], "tf_op": _short(o["tf_op"])}
                        for o in ranked[:top]],
            "by_category": [{"category": c, "ms_per_call": ns / 1e6 / calls, "fraction": ns / total}
                            for c, ns in sorted(categories.items(), key=lambda kv: -kv[1])[:top]]}


def _cost(compiled) -> dict:
    """XLA's static estimate of the compiled gradient (totals only: the per-op keys are many)."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        keep = ("flops", "bytes accessed", "transcendentals", "optimal_seconds")
        cost = {k: float(cost[k]) for k in keep if k in (cost or {})}
    except Exception as e:  # not every backend implements it: say so, keep the rest
        cost = {"error": f"{type(e).__name__}: {e}"}
    try:
        mem = compiled.memory_analysis()
        names = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                 "alias_size_in_bytes", "generated_code_size_in_bytes")
        mem = {k: int(getattr(mem, k)) for k in names if hasattr(mem, k)}
    except Exception as e:
        mem = {"error": f"{type(e).__name__}: {e}"}
    return {"cost": cost, "memory": mem}


def work_profile(spec: dict) -> dict:
    import jax

    cfg, model, prior, ld, pos = _built(spec)
    t0 = time.perf_counter()
    compiled = ld.value_and_grad.lower(pos).compile()  # a cache hit after grads/…/adjoint
    out = dict(_head(spec, cfg), compile_s=time.perf_counter() - t0, **_cost(compiled),
               traced_calls=spec["calls"], seconds_per_call=None, top_ops=None, trace=None)
    _emit(out)
    jax.block_until_ready(compiled(pos))  # warm: allocations and autotuning out of the trace
    tmp = tempfile.mkdtemp(prefix="gpu_check_trace_")
    try:
        t0 = time.perf_counter()
        with jax.profiler.trace(tmp):
            for _ in range(spec["calls"]):
                jax.block_until_ready(compiled(pos))
        out["seconds_per_call"] = (time.perf_counter() - t0) / spec["calls"]  # profiler overhead in
        files = sorted(Path(tmp).rglob("*.xplane.pb"))
        if not files:
            raise FileNotFoundError(f"jax.profiler.trace wrote no *.xplane.pb under {tmp}")
        trace = {"file": files[-1].name, "bytes": files[-1].stat().st_size}
        if spec.get("keep_dir") and trace["bytes"] <= TRACE_COPY_LIMIT:
            keep = Path(spec["keep_dir"])
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(files[-1], keep / files[-1].name)
            trace["copied_to"] = str(keep / files[-1].name)
        out["trace"] = trace
        _emit(out)
        try:
            summary = summarize_trace(files[-1], spec["calls"])
            out["top_ops"] = summary.pop("top_ops")
            trace.update(summary)
        except Exception as e:  # the cost analysis above and the parts item remain
            trace["error"] = f"{type(e).__name__}: {e}"
            out["top_ops"] = []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def work_parts(spec: dict) -> dict:
    """Forward and gradient time of each piece of one PM step, alone, at the config's mesh, on
    a random displacement field (about half a cell) and random density contrasts."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from simulators.forces import paint_density, pm_force
    from simulators.lensing import born_params
    from simulators.lightcone import BornLightcone, samples_per_step

    cfg, model, prior, ld, pos = _built(spec)
    sim, lc, bins = model.cfg, model.lightcone, model.bins
    dtype = jnp.dtype(sim.dtype)
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(2), 4)
    disp = (0.5 * jnp.asarray(sim.cell_size, dtype)
            * jax.random.normal(k1, tuple(sim.particle_shape) + (3,), dtype))
    mesh = tuple(sim.mesh_shape)
    d0 = 0.3 * jax.random.normal(k2, mesh, dtype)
    d1 = 0.3 * jax.random.normal(k3, mesh, dtype)
    painter = BornLightcone(sim, lc, bins.n_bins, samples_per_step(sim, lc))
    params = born_params(cfg.cosmology(), sim, bins, lc.chi_max)
    step = sim.n_steps // 2
    w_force = jax.random.normal(k4, disp.shape, dtype)  # a cotangent, so the gradient is not trivial

    def ffts(x):  # the PM force's transforms: one forward, three inverse
        k = jnp.fft.rfftn(x)
        return [jnp.fft.irfftn(k * (i + 1.0), s=x.shape) for i in range(3)]

    pieces = {
        "paint": (lambda d: paint_density(sim, d), lambda d: (paint_density(sim, d) * d0).sum(),
                  (disp,)),
        "pm_force": (lambda d: pm_force(sim, d), lambda d: (pm_force(sim, d) * w_force).sum(),
                     (disp,)),
        "ffts": (ffts, lambda x: sum((y * d1).sum() for y in ffts(x)), (d0,)),
        "born_project": (lambda a, b: painter.project(params, step, a, b),
                         lambda a, b: painter.project(params, step, a, b).sum(), (d0, d1)),
    }
    out = dict(_head(spec, cfg), parts={}, n_rays=int(lc.sky.n_rays), n_bins=int(bins.n_bins),
               samples_per_step=int(painter.samples_per_step))
    for name, (fwd, loss, args) in pieces.items():
        row = {}
        for what, fn in (("forward", jax.jit(fwd)),
                         ("gradient", jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))))):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            row[f"{what}_compile_s"] = time.perf_counter() - t0
            row[f"{what}_s"] = _median_time(fn, args, spec["evals"])
        out["parts"][name] = row
        _emit(out)
    # A PM step of the forward run paints twice for the force (kick) and the lightcone, forces
    # once and projects once: a rough per-gradient sum to set against grads/…'s median.
    p = out["parts"]
    out["n_steps_times_parts_s"] = sim.n_steps * sum(
        p[n]["forward_s"] + p[n]["gradient_s"] for n in ("pm_force", "born_project")) + \
        sim.n_steps * 2 * (p["paint"]["forward_s"] + p["paint"]["gradient_s"])
    return out


def work_hires(spec: dict) -> dict:
    """Forward maps, their C_ℓ against theory, and the gradient of a shells configuration, one
    stage after another (each emitted, so a timeout keeps the stages before it)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    import simulators

    simulators.enable_x64()
    from experiments.benchmarks.hmc import _rss_mb, device_peak_bytes
    from experiments.config import load_config
    from simulators import flatsky

    cfg = load_config(spec["config"])
    if spec.get("changes"):
        cfg = cfg.with_(**spec["changes"])
    model, cosmo, bins = cfg.build_model(), cfg.cosmology(), cfg.bins()
    shells = getattr(model, "shells", None) or (model,)
    cells = [int(np.prod(s.cfg.mesh_shape)) for s in shells]
    out = {"config": spec["config"], "changes": spec.get("changes") or {},
           "backend": jax.default_backend(), "n_shells": len(shells), "mesh_cells": sum(cells),
           "largest_shell_cells": max(cells), "n_steps": sum(s.cfg.n_steps for s in shells)}
    latent = model.latent(0)
    forward = jax.jit(model.kappa)
    t0 = time.perf_counter()
    kappa = jax.block_until_ready(forward(cosmo, latent))
    out["forward_compile_plus_first_s"] = time.perf_counter() - t0
    out["forward_s"] = _median_time(forward, (cosmo, latent), spec.get("evals", 1))
    out["forward_device_peak_bytes"] = device_peak_bytes()
    _emit(out)

    edges = np.asarray(cfg.ell_edges())
    cl, ell, _ = flatsky.cl_estimate(kappa, cfg.maps.field_deg, edges)
    theory = flatsky.binned_model_cl(lambda l: flatsky.limber_cl(cosmo, bins, l),
                                     cfg.maps.field_deg, cfg.maps.npix, edges)[0]
    i, j = flatsky.pair_indices(bins.n_bins)
    autos = np.flatnonzero(i == j)
    out["cl"] = {"ell": np.asarray(ell).tolist(),
                 "ratio_auto": (np.asarray(cl)[autos] / np.asarray(theory)[autos]).tolist()}
    del kappa
    _emit(out)

    def loss(omega_c, z):
        return jnp.sum(model.kappa(dataclasses.replace(cosmo, Omega_c=omega_c), z) ** 2)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    om = jnp.asarray(cosmo.Omega_c, jnp.float64)
    t0 = time.perf_counter()
    jax.block_until_ready(grad(om, latent))
    out["gradient_compile_plus_first_s"] = time.perf_counter() - t0
    out["gradient_s"] = _median_time(grad, (om, latent), spec.get("evals", 1))
    peak = device_peak_bytes()
    out.update(device_peak_bytes=peak, peak_rss_mb=_rss_mb(),
               device_bytes_per_cell=None if peak is None else peak / sum(cells))
    return out


WORKERS = {"env": work_env, "grads": work_grads, "vmap": work_vmap, "profile": work_profile,
           "parts": work_parts, "hires": work_hires}


# ------------------------------------------------------------------------------------------------
# The orchestrator: one subprocess per item, the JSON rewritten after each.


def child_env(smoke: bool, cache_dir: str) -> dict:
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    env["PYTHONUNBUFFERED"] = "1"
    if smoke:
        env["JAX_PLATFORMS"] = "cpu"  # even on a GPU machine: the smoke run tests the script
    root = str(Path(__file__).resolve().parents[2])  # the tree this file is in, not an install
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_subprocess(item: Item, timeout_s: float, env: dict) -> tuple[str, dict | None, str | None]:
    """(status, result, error) of one item in a fresh Python: "ok", "timeout" (result: the last
    stage it printed, if any) or "error" (error: the last line of its stderr)."""
    cmd = [sys.executable, "-m", "experiments.benchmarks.gpu_check", "_item", item.kind,
           json.dumps(item.spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        stdout, stderr, status = proc.stdout, proc.stderr, "ok" if proc.returncode == 0 else "error"
    except subprocess.TimeoutExpired as e:  # run() killed it; what it printed is kept
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        stdout, stderr, status = text(e.stdout), text(e.stderr), "timeout"
    result = None
    for line in reversed(stdout.strip().splitlines()):
        try:
            result = json.loads(line)
            break
        except json.JSONDecodeError:
            continue  # a library's print, or a line cut by the kill
    error = None
    if status == "error":
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        error = lines[-1] if lines else f"exit status {proc.returncode}"
    elif status == "timeout":
        error = f"timed out after {timeout_s:.0f} s"
    return status, result, error


def missing_keys(kind: str, result: dict | None) -> list[str]:
    if result is None:
        return list(KEYS[kind])
    missing = [k for k in KEYS[kind] if k not in result]
    if kind == "vmap":
        missing += [f"batches[{i}].{k}" for i, b in enumerate(result.get("batches", []))
                    for k in BATCH_KEYS if k not in b]
    return missing


def _write(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)  # atomic: a kill mid-write leaves the previous complete file


def refusal(env_result: dict | None, smoke: bool) -> str | None:
    """The one-line reason not to go on after the env item, or None."""
    if env_result is None:
        return None
    backend = env_result.get("backend")
    if not smoke and backend != "gpu":
        return NO_GPU.format(backend=backend)
    return None


def run_plan(items: list[Item], out: Path, *, smoke: bool, budget_s: float,
             runner=run_subprocess, echo=print, clock=time.monotonic) -> dict:
    """Run the items in order under one budget; rewrite ``out`` after each. Returns the document
    (with ``"refused"`` set, and ``out`` not written, when the env item finds no GPU)."""
    t_start = clock()
    doc = {"schema": 1, "mode": "cpu-smoke" if smoke else "gpu",
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": budget_s,
           "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "finished": False,
           "items": {it.name: {"kind": it.kind, "status": "pending", "timeout_s": it.timeout_s,
                               "spec": it.spec} for it in items}}
    cache = tempfile.mkdtemp(prefix="gpu_check_xla_")
    env = child_env(smoke, cache)
    try:
        for it in items:
            row = doc["items"][it.name]
            left = budget_s - (clock() - t_start)
            if left < MIN_ITEM_S:
                row.update(status="skipped", error=f"budget spent ({left:.0f} s left)")
                echo(f"{it.name:32s} skipped: {row['error']}")
                if it.kind != "env":
                    _write(out, doc)
                continue
            timeout = min(it.timeout_s, left)
            t0 = clock()
            status, result, error = runner(it, timeout, env)
            wall = clock() - t0
            missing = missing_keys(it.kind, result) if status == "ok" else []
            if missing:
                status, error = "error", f"result lacks {', '.join(missing)}"
            row.update(status=status, wall_s=wall, timeout_s=timeout, result=result, error=error)
            if it.kind == "env":
                why = (refusal(result, smoke) if status == "ok"
                       else f"gpu_check: the environment probe failed: {error}")
                if why:
                    doc["refused"] = why
                    return doc
            doc["total_wall_s"] = clock() - t_start
            _write(out, doc)
            echo(describe(it.name, row))
        doc["finished"] = True
        doc["total_wall_s"] = clock() - t_start
        _write(out, doc)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return doc


# ------------------------------------------------------------------------------------------------
# The printed table


def _mb(b) -> str:
    return "-" if b is None else f"{b / 2**20:.0f} MB"


def describe(name: str, row: dict) -> str:
    """One line per item (a few for vmap, profile and parts). Never raises: a table line must
    not stop the items after it."""
    try:
        return _describe(name, row)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        return (f"{name:40s} {row.get('status', '?'):8s} {row.get('wall_s', 0):6.0f} s  "
                f"{row.get('error') or ''} (partial result: {type(e).__name__} {e})")


def _describe(name: str, row: dict) -> str:
    r = row.get("result") or {}
    head = f"{name:40s} {row['status']:8s} {row.get('wall_s', 0):6.0f} s"
    if row["status"] != "ok" and not r:
        return f"{head}  {row.get('error') or ''}"
    kind = row["kind"]
    tail = f"  ({row['error']})" if row.get("error") else ""
    if kind == "env":
        gpu = r.get("nvidia_smi", "").splitlines()[1:] or [r.get("device_kind", "?")]
        return f"{head}  {gpu[0]}; jax {r.get('jax_version')} ({r.get('backend')}){tail}"
    if kind == "grads":
        per_cell = r.get("device_bytes_per_mesh_cell")
        return (f"{head}  {1e3 * r['median_seconds_per_gradient']:9.1f} ms/grad "
                f"{r['gradients_per_s']:7.2f} grad/s  compile {r['compile_plus_first_s']:5.1f} s  "
                f"peak {_mb(r.get('device_peak_bytes'))}"
                + (f" ({per_cell:.0f} B/cell)" if per_cell is not None else
                   f" (RSS {r['peak_rss_mb']:.0f} MB)") + tail)
    if kind == "vmap":
        lines = [head + tail]
        for b in r.get("batches", []):
            lines.append(f"{'':40s}   K={b['K']:<3d} {b['gradients_per_s']:8.2f} grad/s  "
                         f"{1e3 * b['median_seconds']:9.1f} ms/call  peak {_mb(b['device_peak_bytes'])}"
                         + (f"  ×{b['speedup_over_K1']:.2f} vs K=1" if b["speedup_over_K1"] else ""))
        return "\n".join(lines)
    if kind == "profile":
        lines = [head + (f"  {r['seconds_per_call']:.3f} s/call traced" if r.get("seconds_per_call")
                         else "") + f"  flops {r.get('cost', {}).get('flops', float('nan')):.3g}"
                 + tail]
        trace = r.get("trace") or {}
        if trace.get("error"):
            lines.append(f"{'':40s}   trace not parsed: {trace['error'][:200]}")
        for o in r.get("top_ops") or []:
            lines.append(f"{'':40s}   {o['ms_per_call']:9.2f} ms {100 * o['fraction']:5.1f}%"
                         f"  {o['op'][:40]:40s} {(o.get('category') or '')[:20]}")
        return "\n".join(lines)
    if kind == "hires":
        per_cell = r.get("device_bytes_per_cell")
        return (f"{head}  {r['mesh_cells'] / 1e6:.1f}M cells: forward {r['forward_s']:.1f} s, "
                f"gradient {r['gradient_s']:.1f} s, peak {_mb(r.get('device_peak_bytes'))}"
                + (f" ({per_cell:.0f} B/cell)" if per_cell is not None else
                   f" (RSS {r['peak_rss_mb']:.0f} MB)") + tail)
    if kind == "parts":
        lines = [head + tail]
        for n, p in r.get("parts", {}).items():
            lines.append(f"{'':40s}   {n:14s} forward {1e3 * p['forward_s']:8.2f} ms  "
                         f"gradient {1e3 * p['gradient_s']:8.2f} ms")
        return "\n".join(lines)
    return head + tail


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_item"]:  # internal: one item in this (fresh) process
        kind, spec = argv[1], json.loads(argv[2])
        _emit(WORKERS[kind](spec))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--cpu-smoke", action="store_true", help="every item at tiny sizes on CPU")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for all items (default {DEFAULT_BUDGET_S:.0f}; x10 with --cpu-smoke)")
    ap.add_argument("--only", default=None,
                    help="comma-separated item names or prefixes to run (env always runs)")
    args = ap.parse_args(argv)
    if args.budget is None:  # CPU compiles are slow: the smoke run's items have 10x timeouts too
        args.budget = DEFAULT_BUDGET_S * (10 if args.cpu_smoke else 1)
    items = plan(args.cpu_smoke)
    if args.only:
        wanted = [w for w in args.only.split(",") if w]
        items = [it for it in items if it.kind == "env" or any(it.name.startswith(w) for w in wanted)]
    for it in items:  # the trace goes next to the JSON, where the lease copies files back from
        if it.kind == "profile":
            it.spec["keep_dir"] = str(args.out.resolve().with_name(args.out.stem + "_trace"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = run_plan(items, args.out, smoke=args.cpu_smoke, budget_s=args.budget,
                   echo=lambda s: print(s, flush=True))
    if doc.get("refused"):
        print(doc["refused"], file=sys.stderr)
        return 1
    bad = [n for n, r in doc["items"].items() if r["status"] != "ok"]
    print(f"gpu_check: {len(items) - len(bad)}/{len(items)} items ok in {doc['total_wall_s']:.0f} s"
          + (f"; not ok: {', '.join(bad)}" if bad else "") + f"; wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
