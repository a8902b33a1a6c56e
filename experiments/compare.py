"""``lensbench compare``: every method on one simulator and one observation, cached stage by stage.

    observation ─┬─► cl_analytic                         (C_ℓ likelihood, NUTS)
                 ├─► hmc                                 (explicit field-level inference)
                 ├─► exact                               (grid posterior; Gaussian-field maps)
    sims ────────┼─► compressor_<loss> ─► npe_<loss>     (two-stage implicit inference)
                 ├─► npe_cl, npe_maps                    (NPE on C_ℓ, one-stage NPE)
                 └─► cl_calibration                      (SBC/TARP of the C_ℓ likelihood)
    all methods ─► metrics (metrics.json) ─► report (figures, report.md)

Output directory layout::

    observation.h5            the observed maps (simulated at [cosmology] with the top-level seed,
                              or a copy of compare.observation)
    sims.h5                   the training set (``lensbench generate``), when an NPE method runs
    compressors/<loss>/       trained compressors;  posteriors/<method>/  fitted NPE + calibration
    hmc/                      the chains and checkpoints of the explicit run
    samples/<method>.h5       posterior samples, one file per method (``experiments.io.Samples``)
    metrics.json, figures/, report.md
    stages/<stage>.json       one marker per finished stage (see below)
    logs/<stage>.log          the output of a stage run in the background (see Cores)

Caching. A stage's marker records a fingerprint of the configuration sections it reads and of the
runs of the stages it depends on. A rerun skips a stage whose marker matches, reruns one whose
inputs changed (and so everything downstream), and ``--force STAGE`` reruns that stage (and
downstream). Stages that take long also resume inside themselves after a kill (``generate``,
compressor training, HMC segments), so a killed ``compare`` loses at most the work since a stage's
last checkpoint. A stage redone because its inputs changed starts clean, except where the only
change is a larger value of a key the stage can grow into (``Stage.grows``: a larger
``hmc.num_samples`` continues the finished chains rather than sampling them again).

Cores. The C_ℓ likelihood's NUTS (``cl_analytic``) keeps one core busy for a minute or more, while
the implicit stages after it leave the other one mostly idle. On a CPU with two cores or more it
therefore runs as a child process (``lensbench cl-baseline``, pinned to the last core, its log in
``logs/cl_analytic.log``) while the stages after it run here; it is waited for before a stage that
needs it or uses every core (``hmc``). Its results and marker are the same either way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .files import atomic_write, write_json, write_text
from .jaxsetup import configured, cpu_devices_for
from .maps import run_maps

# The sections each kind of stage reads (besides its upstream stages' outputs).
_MAPS = ("cosmology", "simulation", "lightcone", "shells", "maps", "sources")

# Figures, relative to the out dir: the observation stage draws MAPS_PNG, the report the others.
MAPS_PNG = "figures/maps.png"
CONTOURS_PNG = "figures/contours.png"
CL_DATA_PNG = "figures/cl_data.png"
# SBC/TARP of the C_ℓ likelihood, where the report looks for every method's calibration
CL_CALIBRATION = "posteriors/cl_analytic/calibration"


class StageError(ValueError):
    """An unknown stage name, or an output directory that cannot be used."""


@dataclass(frozen=True)
class Stage:
    """One cacheable step: ``run(out_dir)`` writes ``outputs`` (paths relative to the out dir)."""

    name: str
    sections: tuple[str, ...]
    needs: tuple[str, ...]
    run: Callable[[Path], dict | None]
    outputs: tuple[str, ...] = ()
    # "section.key"s whose increase the stage continues into from its finished outputs
    grows: tuple[str, ...] = ()
    # the stage as a ``lensbench`` command line, for a child process that runs it while the
    # stages after it run here (``_in_background`` decides), and its marker fields read from its
    # outputs afterwards; None: always in this process
    command: Callable[[Path], list[str]] | None = None
    collect: Callable[[Path], dict] | None = None
    # a stage that keeps every core busy: stages running in the background finish before it
    exclusive: bool = False


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _losses(methods) -> list[str]:
    return [m[4:] for m in methods if m in ("npe_mse", "npe_mae", "npe_gnll", "npe_vmim")]


def plan(cfg) -> list[Stage]:
    """The stages of ``cfg.compare.methods``, in an order that respects their dependencies."""
    from . import pipeline

    methods = cfg.compare.methods
    # MAPS_PNG is not an output of the observation: a missing image would redo the observation
    # and so every stage downstream of it
    stages = [Stage("observation", _MAPS + ("seed", "compare.observation"), (),
                    lambda out: _observation(cfg, out), ("observation.h5",))]
    obs = lambda out: out / "observation.h5"  # noqa: E731
    if "cl_analytic" in methods:  # first after the observation: it may run in the background
        cl_out = lambda out: out / "samples/cl_analytic.h5"  # noqa: E731
        stages.append(Stage("cl_analytic", ("prior", "cl", "cl_baseline", "scales"), ("observation",),
                            lambda out: _meta(pipeline.run_cl_baseline(
                                cfg, obs(out), cl_out(out), progress=_progress())),
                            ("samples/cl_analytic.h5",),
                            command=lambda out: ["cl-baseline", "--config", str(out / "config.toml"),
                                                 "--maps", str(obs(out)), "--out", str(cl_out(out)),
                                                 "--no-progress"],
                            collect=lambda out: _meta(_read_samples(cl_out(out)))))
    npe = [m for m in methods if m.startswith("npe_")]
    if npe:
        stages.append(Stage("sims", _MAPS + ("prior", "training_set"), (),
                            lambda out: _generate_meta(pipeline.run_generate(cfg, out / "sims.h5",
                                                                      progress=_progress())),
                            ("sims.h5",)))
    for loss in _losses(methods):
        stages.append(Stage(f"compressor_{loss}", ("compressor", "scales"), ("sims",),
                            lambda out, loss=loss: _train(cfg, out, loss),
                            (f"compressors/{loss}",)))
    for m in npe:
        summary = m[4:] if m in ("npe_cl", "npe_maps") else "compressor"
        needs = ("sims", "observation") + (("compressor_" + m[4:],) if summary == "compressor" else ())
        sections = ("npe", "cl", "scales") if summary == "cl" else ("npe", "scales")
        stages.append(Stage(m, sections, needs,
                            lambda out, m=m, summary=summary: _npe(cfg, out, m, summary),
                            (f"posteriors/{m}", f"samples/{m}.h5")))
    if "cl_analytic" in methods and npe:
        # the C_ℓ likelihood certified as NPE is: SBC and TARP on the same held-out simulations
        stages.append(Stage("cl_calibration", ("prior", "cl", "cl_baseline", "scales", "npe"),
                            ("sims",), lambda out: (pipeline.calibrate_cl_baseline(
                                cfg, out / "sims.h5", out / CL_CALIBRATION), {})[1],
                            (CL_CALIBRATION,)))
    if "hmc" in methods:
        stages.append(Stage("hmc", ("prior", "hmc", "scales"), ("observation",),
                            lambda out: _meta(pipeline.run_hmc(cfg, obs(out), out / "hmc",
                                                               samples_out=out / "samples/hmc.h5",
                                                               progress=True)),  # lines off a tty
                            ("hmc", "samples/hmc.h5"), grows=("hmc.num_samples",), exclusive=True))
    if "exact" in methods:
        stages.append(Stage("exact", ("prior", "scales"), ("observation",),
                            lambda out: _meta(pipeline.run_exact(cfg, obs(out),
                                                                 out / "samples/exact.h5")),
                            ("samples/exact.h5",)))
    if cfg.compare.efficiency:
        from .efficiency import reference_method, run_efficiency

        # trains its own compressors and NPEs, one per size (kept across reruns: each point
        # knows the settings it was trained with), and scores them against the reference
        ref = reference_method(methods, cfg.compare.reference)
        needs = ("sims", "observation") + ((ref,) if ref != "reference" else ()) + (
            ("hmc",) if "hmc" in methods and ref != "hmc" else ())
        stages.append(Stage("efficiency", ("compare", "training_set", "compressor", "npe", "cl",
                                           "scales"),
                            needs, lambda out: (run_efficiency(cfg, out), {})[1],
                            ("efficiency.json",)))
    stages.append(Stage("metrics", ("compare",), tuple(methods) + tuple(
                            s.name for s in stages if s.name == "cl_calibration"),
                        lambda out: _metrics(cfg, out), ("metrics.json",)))
    stages.append(Stage("report", (), ("metrics",) + (("efficiency",) if cfg.compare.efficiency
                                                      else ()),
                        lambda out: _report_stage(cfg, out),
                        ("report.md", CONTOURS_PNG)
                        + ((CL_DATA_PNG,) if "cl_analytic" in methods else ())))
    return stages


def stage_names(cfg) -> list[str]:
    return [s.name for s in plan(cfg)]


def _progress() -> bool:
    return sys.stderr.isatty()


def _generate_meta(report) -> dict:
    """The sims marker's counts, and the rate of this invocation's own simulations
    (``GenerateReport.sims_per_s``): after a resume, n_ok counts earlier invocations' too."""
    if report is None:
        return {}
    return {"n_ok": int(report.n_ok), "n_simulated": int(report.n_simulated),
            "sims_per_s": float(report.sims_per_s)}


def _read_samples(path: Path):
    from .io import read_samples

    return read_samples(path)


def _meta(samples) -> dict:
    info = dict(samples.info or {})
    return {"wall_time_s": info.get("wall_time_s"), "n_samples": int(len(samples.samples))}


# ---- stage bodies ----------------------------------------------------------------------------------

def _observation(cfg, out: Path) -> dict:
    from .pipeline import read_observation

    target = out / "observation.h5"
    src = cfg.compare.observation
    if src is None:
        run_maps(cfg, target, png=out / MAPS_PNG, progress=_progress())
    else:
        obs = read_observation(cfg, src)
        atomic_write(target, lambda tmp: shutil.copyfile(src, tmp))
        from .plots import plot_maps

        plot_maps(out / MAPS_PNG, obs.kappa_noisy, sky=obs.sky,
                  field_deg=cfg.maps.field_deg, title=f"observation {Path(src).name} (noisy)")
    return {}


def _train(cfg, out: Path, loss: str) -> dict:
    from .pipeline import run_train_compressor

    run_train_compressor(cfg, out / "sims.h5", out / "compressors" / loss, loss=loss,
                         progress=_progress())
    return {}


def _npe(cfg, out: Path, method: str, summary: str) -> dict:
    from .pipeline import run_fit_posterior, run_sample

    post = out / "posteriors" / method
    comp = out / "compressors" / method[4:] if summary == "compressor" else None
    run_fit_posterior(cfg, out / "sims.h5", post, compressor=comp,
                      summary=summary, progress=_progress())
    samples = run_sample(post, out / "observation.h5", out / "samples" / f"{method}.h5",
                         seed=cfg.npe.seed)
    return _meta(samples)


def _load_samples(cfg, out: Path) -> dict:
    return {m: _read_samples(out / "samples" / f"{m}.h5") for m in cfg.compare.methods}


def _truth_and_base(cfg, out: Path) -> tuple[dict, dict]:
    from .io import read_maps

    obs = read_maps(out / "observation.h5")
    base = cfg.cosmology_params()
    return {k: float(obs.attrs[k]) for k in base if k in obs.attrs}, base


def _metrics(cfg, out: Path) -> dict:
    from .metrics import compare_metrics, write_metrics

    samples = _load_samples(cfg, out)
    truth, base = _truth_and_base(cfg, out)
    budget = budgets(cfg, out)
    for m, s in samples.items():
        # like-for-like cost: every stage the method needed (simulations, training, sampling)
        s.info.update(wall_time_s=budget[m]["wall_s"], n_simulations=budget[m]["n_simulations"])
        cal = out / "posteriors" / m / "calibration" / "calibration.json"
        if s.info.get("calibration") is None and cal.is_file():  # calibrated by its own stage
            s.info["calibration"] = str(cal)
    metrics = compare_metrics(samples, base=base, truth=truth, max_samples=cfg.compare.c2st_samples,
                              seed=cfg.compare.seed, ess_min=cfg.compare.ess_min,
                              r_hat_max=cfg.compare.r_hat_max)
    metrics["stages"] = budget
    cuts = cfg.scale_cuts()
    # the multipoles every method saw (null: all of them): ell_min, ell_max per bin
    metrics["scale_cuts"] = None if cuts is None else {
        "ell_min": list(cuts[0]), "ell_max": [v if np.isfinite(v) else None for v in cuts[1]]}
    write_metrics(out / "metrics.json", metrics)
    return {}


def budgets(cfg, out: Path) -> dict:
    """Per method: the wall time (s) of every stage it needed, its own and upstream (the
    observation excepted), and the simulations it consumed: the training set, or the covariance
    simulations, plus, for an NPE on a compressor trained online (``compressor.online = true``),
    the fresh simulations that compressor drew while training (``online_simulations``)."""
    by_name = {s.name: s for s in plan(cfg)}
    done = {n: _read_marker(out, n) for n in by_name}

    def upstream(name, seen):
        for dep in by_name[name].needs:
            if dep not in seen:
                seen.add(dep)
                upstream(dep, seen)
        return seen

    result = {}
    for m in cfg.compare.methods:
        stages = sorted(upstream(m, {m}) - {"observation"})
        walls = {s: _stage_seconds(done[s]) for s in stages}
        n_sims = (cfg.training_set.n_sims if m.startswith("npe_")
                  else cfg.cl_baseline.n_cov if m == "cl_analytic"
                  and cfg.cl_baseline.covariance == "simulated" else 0)
        n_sims += _online_draws(out, stages)
        result[m] = {"stages": walls, "wall_s": float(sum(v for v in walls.values() if v)),
                     "n_simulations": n_sims}
    return result


def _online_draws(out: Path, stages) -> int:
    """Fresh simulations the compressors among ``stages`` drew while training online."""
    import json

    total = 0
    for stage in stages:
        if stage.startswith("compressor_"):
            path = out / "compressors" / stage[len("compressor_"):] / "compressor.json"
            if path.is_file():
                total += int(json.loads(path.read_text()).get("online_simulations", 0))
    return total


def _stage_seconds(marker: dict | None) -> float | None:
    """A finished stage's wall time (s). The marker's wall_s covers only the invocation that
    finished the stage; a stage resumed after a kill also spent the earlier ones, which methods that
    keep their own clock across resumes (HMC chains: sampling time summed over resumes) report as
    wall_time_s. The larger of the two is the better (still lower) bound."""
    if not marker:
        return None
    own = marker.get("wall_time_s")
    return max(marker["wall_s"], own) if isinstance(own, (int, float)) else marker["wall_s"]


def _report_stage(cfg, out: Path) -> dict:
    """Figures (contours, observed maps, C_ℓ data vs theory, calibration) and report.md."""
    from .metrics import converged_flags, read_metrics
    from .plots import plot_cl_data_theory, plot_triangle
    from .report import write_report

    metrics = read_metrics(out / "metrics.json")
    samples = _load_samples(cfg, out)
    truth, base = _truth_and_base(cfg, out)
    figures = {"Posterior contours (truth marked)":
               plot_triangle(out / CONTOURS_PNG, samples, base=base, truth=truth,
                             title=f"{cfg.name}: posteriors", converged=converged_flags(metrics)),
               "Observed convergence maps": out / MAPS_PNG}
    if "cl_analytic" in samples:
        from .pipeline import cl_data_path

        with np.load(cl_data_path(out / "samples" / "cl_analytic.h5")) as z:
            figures["C_ℓ of the observation against the theory at the truth"] = plot_cl_data_theory(
                out / CL_DATA_PNG, z["ell"], z["data"], {"theory at truth": z["theory"]},
                cov=z["cov"], title=f"{cfg.name}: tomographic C_ell (noise included)")
    calibration = {}
    for m in samples:
        cal_dir = out / "posteriors" / m / "calibration"
        if (cal_dir / "calibration.json").is_file():
            calibration[m] = cal_dir / "calibration.json"
            for png in sorted(cal_dir.glob("*.png")):
                figures[f"{m}: {png.stem.replace('_', ' ')} on held-out simulations"] = png
    hmc_diag = out / "hmc" / "diagnostics.json"
    if hmc_diag.is_file():
        metrics.setdefault("hmc_diagnostics", json.loads(hmc_diag.read_text()))
    efficiency = None
    if cfg.compare.efficiency:
        efficiency = json.loads((out / "efficiency.json").read_text())
        figures["Simulation efficiency: C2ST and FoM against the simulations spent"] = (
            out / "efficiency" / "efficiency.png")
    write_report(out, metrics, figures, title=f"lensbench compare: {cfg.name}",
                 config_toml=cfg.to_toml(), calibration=calibration, efficiency=efficiency)
    return {}


# ---- the runner -------------------------------------------------------------------------------------

# keys that change how a stage runs but not what it writes: changing them reuses finished stages
RUN_ONLY_KEYS = {"hmc": ("processes",)}


def _fingerprint(cfg, stage: Stage, upstream_runs: dict, *, without_grows: bool = False) -> str:
    """Hash of what ``stage`` reads; ``without_grows`` leaves out its ``grows`` keys as well."""
    data = cfg.to_dict()
    drop = {s: set(keys) for s, keys in RUN_ONLY_KEYS.items()}
    for dotted in stage.grows if without_grows else ():
        section, _, key = dotted.partition(".")
        drop.setdefault(section, set()).add(key)
    for section, keys in drop.items():
        data[section] = {k: v for k, v in data.get(section, {}).items() if k not in keys}
    picked = {}
    for s in stage.sections:
        section, _, leaf = s.partition(".")
        value = data.get(section)
        picked[s] = value.get(leaf) if leaf and isinstance(value, dict) else value
    blob = json.dumps({"stage": stage.name, "sections": picked, "upstream": upstream_runs},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _marker_path(out: Path, name: str) -> Path:
    return out / "stages" / f"{name}.json"


def _read_marker(out: Path, name: str) -> dict | None:
    path = _marker_path(out, name)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        _log(f"warning: stage marker {path} is unreadable; the stage will run again")
        return None


def _write_marker(out: Path, name: str, marker: dict) -> None:
    write_json(_marker_path(out, name), marker)


def compare(cfg, out, *, force: tuple[str, ...] = ()) -> dict:
    """Run (or resume) every stage of ``cfg.compare.methods`` into ``out``.

    force: stage names to rerun even if cached ("all" for every stage). Returns the metrics dict.
    Raises StageError for an unknown stage name, ValueError/OSError from the stages.
    """
    out = Path(out)
    stages = plan(cfg)
    names = [s.name for s in stages]
    force = set(force)
    unknown = force - set(names) - {"all"}
    if unknown:
        raise StageError(f"unknown stage(s) {', '.join(sorted(unknown))} for --force; this "
                         f"configuration's stages: {', '.join(names)}, or 'all'")
    if "all" in force:
        force = set(names)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.toml", cfg.to_toml())
    runs: dict[str, str] = {}
    t_all = time.perf_counter()
    pending: dict[str, _Background] = {}

    def join(names) -> None:  # wait for these background stages; their run ids into runs
        for name in list(names):
            runs[name] = pending[name].finish()
            del pending[name]

    try:
        for i, stage in enumerate(stages):
            join(n for n in pending if n in stage.needs)
            upstream = {d: runs[d] for d in stage.needs}
            fp = _fingerprint(cfg, stage, upstream)
            marker = _read_marker(out, stage.name)
            outputs_there = all((out / o).exists() for o in stage.outputs)
            if (marker and marker.get("fingerprint") == fp and stage.name not in force
                    and outputs_there):
                runs[stage.name] = marker["run_id"]
                _log(f"[{i + 1}/{len(stages)}] {stage.name}: done before ({marker['wall_s']:.0f} "
                     f"s), skipped")
                continue
            why = ("forced" if stage.name in force else "first run" if marker is None
                   else "outputs missing" if not outputs_there else "inputs changed")
            grows = _grows(cfg, stage, upstream, marker) if why == "inputs changed" else None
            if grows:
                why = f"continuing: {grows}"
            if stage.exclusive:  # it needs every core
                join(pending)
            background = stage.command is not None and _in_background()
            where = (f" in a background process (log: {out / 'logs' / stage.name}.log)"
                     if background else "")
            _log(f"[{i + 1}/{len(stages)}] {stage.name}: running ({why}){where}")
            if grows:
                _marker_path(out, stage.name).unlink()  # a kill from here on resumes the stage
            elif marker is not None:
                # a finished stage being redone: start clean. Without a marker (first run, or a
                # run killed inside the stage) its partial outputs stay, so that the stage resumes.
                _remove_outputs(out, stage)
                _marker_path(out, stage.name).unlink()
            done = functools.partial(_finish_stage, cfg, out, stage, upstream, fp,
                                     f"[{i + 1}/{len(stages)}]")
            if background:
                pending[stage.name] = _Background(out, stage, done)
                continue
            t0 = time.perf_counter()
            extra = stage.run(out) or {}
            runs[stage.name] = done(time.perf_counter() - t0, extra)
        join(pending)
    finally:
        for job in pending.values():  # an error here: keep what finished, stop the others
            job.stop()
    _log(f"compare: all {len(stages)} stages done ({time.perf_counter() - t_all:.0f} s this run); "
         f"report: {out / 'report.md'}")
    return json.loads((out / "metrics.json").read_text())


def _finish_stage(cfg, out: Path, stage: Stage, upstream: dict, fp: str, counter: str,
                  wall: float, extra: dict) -> str:
    """Write a stage's marker after it ran (``wall`` seconds, ``extra`` marker fields) and
    return its run id."""
    run_id = uuid.uuid4().hex[:12]
    _write_marker(out, stage.name, {"stage": stage.name, "fingerprint": fp, "run_id": run_id,
                                    "base_fingerprint": _fingerprint(cfg, stage, upstream,
                                                                     without_grows=True),
                                    "grows": _grow_values(cfg, stage), "wall_s": wall,
                                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                    "outputs": list(stage.outputs), **extra})
    _log(f"{counter} {stage.name}: finished in {wall:.0f} s")
    _test_hook_stop(stage.name)
    return run_id


def _in_background() -> bool:
    """Whether a stage with a command line runs in a child process: on a CPU backend with at
    least two cores for this process (Linux), where it then takes the last one."""
    import jax

    return (jax.default_backend() == "cpu" and hasattr(os, "sched_getaffinity")
            and len(os.sched_getaffinity(0)) >= 2)


class _Background:
    """A stage running as a ``lensbench`` child process (``Stage.command``), pinned to this
    process's last core and stopped if this process dies (``pipeline.start_child_process``);
    ``finish`` waits for it, echoes its log and writes its marker."""

    def __init__(self, out: Path, stage: Stage, done: Callable[[float, dict], str]):
        import subprocess

        from .pipeline import CHILD_CORES_ENV, PARENT_PID_ENV

        self.out, self.stage, self.done, self.t0 = out, stage, done, time.time()
        self.log_path = out / "logs" / f"{stage.name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        core = sorted(os.sched_getaffinity(0))[-1]
        env = dict(os.environ, LENSBENCH_THREADS="1",
                   **{PARENT_PID_ENV: str(os.getpid()), CHILD_CORES_ENV: str(core)})
        cmd = [sys.executable, "-m", "experiments.cli", *stage.command(out)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def finish(self) -> str:
        code = self.proc.wait()
        self.log.close()
        # the child's own time: until its last line, not until this process came to wait for it
        wall = max(0.0, min(time.time(), self.log_path.stat().st_mtime) - self.t0)
        text = self.log_path.read_text()
        if code:
            for line in text[-3000:].splitlines():
                _log(f"  {self.stage.name} | {line}")
            raise ChildProcessError(f"stage {self.stage.name} failed in its background process "
                                    f"(exit {code}); its log: {self.log_path}")
        name = self.stage.name
        for line in text.splitlines():
            if line.strip():
                _log(f"  {line if line.startswith(name + ':') else f'{name}: {line}'}")
        return self.done(wall, self.stage.collect(self.out) or {})

    def stop(self) -> None:
        """After an error elsewhere: a child that finished cleanly gets its marker (its work is
        kept), a running one is stopped."""
        if self.proc.poll() == 0:
            try:
                self.finish()
                return
            except Exception:  # noqa: BLE001 -- the error being raised matters more
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        self.log.close()


def run_compare(config, out: Path, *, force: tuple[str, ...] = (),
                overrides: tuple[str, ...] = ()) -> dict:
    """``compare`` of a configuration given as a shipped name, a TOML path or an
    ``ExperimentConfig``, with ``--set KEY=VALUE`` ``overrides``: the CPU devices of its device
    grid are asked for before JAX starts (``lensbench compare`` and ``demo``)."""
    config = configured(config, overrides)
    cpu_devices_for(config.simulation.pdim_tuple)
    return compare(config, out, force=tuple(force))


def _grow_values(cfg, stage: Stage) -> dict:
    data = cfg.to_dict()
    return {k: data.get(k.partition(".")[0], {}).get(k.partition(".")[2]) for k in stage.grows}


def _grows(cfg, stage: Stage, upstream: dict, marker: dict) -> str | None:
    """'key old → new, ...' when the only change since ``marker`` is larger ``stage.grows`` values
    (the stage then continues from its outputs); None otherwise."""
    if not stage.grows or marker.get("base_fingerprint") != _fingerprint(
            cfg, stage, upstream, without_grows=True):
        return None
    old, new = marker.get("grows") or {}, _grow_values(cfg, stage)
    if set(old) != set(new) or not all(
            isinstance(old[k], int) and isinstance(new[k], int) and new[k] >= old[k] for k in new):
        return None
    return ", ".join(f"{k} {old[k]} → {new[k]}" for k in new if new[k] != old[k]) or None


def _remove_outputs(out: Path, stage: Stage) -> None:
    for rel in stage.outputs:
        path = out / rel
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        for side in path.parent.glob(path.name + ".*"):  # e.g. samples/x.h5.data.npz
            # the C_ell covariance cache is keyed by what it depends on: keep it
            if side.is_file() and not side.name.endswith(".cov.npz"):
                side.unlink()


def _test_hook_stop(stage: str) -> None:
    """LENSBENCH_COMPARE_KILL_AFTER=<stage>: die like a SIGKILL right after that stage's marker is
    written (tests of resumption; os._exit skips every cleanup, as a kill would)."""
    if os.environ.get("LENSBENCH_COMPARE_KILL_AFTER") == stage:
        os._exit(137)
