"""The implicit-inference and C_ℓ-baseline stages, one function per ``lensbench`` command.

    generate          config -> sims.h5                (θ ~ prior, noise-free κ; resumable)
                      [--part I/N: part I of N -> its own file; `merge` joins the parts]
    train-compressor  config + sims.h5 -> compressor/  (flax network, loss mse|mae|gnll|vmim)
    compress          compressor/ + maps or sims -> summaries.h5
    fit-posterior     config + sims.h5 [+ compressor/] -> posterior/  (sbi NPE + calibration)
    sample            posterior/ + maps.h5 -> samples.h5
    cl-baseline       config + maps.h5 -> samples.h5   (analytic C_ℓ likelihood, NUTS)

Every stage reads files the previous one wrote and writes one output, so ``compare`` can cache
and resume stages. Summaries given to NPE come in three kinds, recorded in ``posterior/lensbench.json``:
"compressor" (two-stage: a trained compressor's summaries of the noisy maps), "cl" (the binned
tomographic C_ℓ data vector: the simulation-based C_ℓ baseline) and "maps" (one-stage: sbi trains
a CNN embedding end to end).

Held-out simulations. The last ``training_set.n_calibration`` simulations of a sims file are
never used for training (compressor or NPE); ``fit-posterior`` calibrates on them (SBC, TARP).

Noise. Sims files hold noise-free maps. Compressor training adds fresh shape noise per batch; NPE
uses ``npe.noise_copies`` noisy copies of each simulation, drawn from ``npe.seed``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import save_npz, write_json, write_text
# What defines the field-level posterior besides [prior] and [hmc]: a run resumed or extended
# with any of these changed would mix chains of two posteriors.
from .io import LAYOUT_KEYS as _LAYOUT_KEYS, MODEL_SECTIONS as _MODEL_SECTIONS

SUMMARIES = ("compressor", "cl", "maps")
# nflows (inside sbi) calls a torch function deprecated in torch 2.x on every MAF/NSF inverse
warnings.filterwarnings("ignore", message=r"torch\.triangular_solve is deprecated")
_META = "lensbench.json"


def _log(message: str) -> None:
    """Progress to stderr; under jax.distributed from process 0 only (every process runs the same
    stages). Before jax.distributed starts, nothing here may start a JAX backend."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized() and jax.process_index() != 0:
        return
    print(message, file=sys.stderr, flush=True)


def _check_ram(nbytes: int, what: str) -> None:
    """Refuse work whose arrays cannot fit in this machine's memory, naming what sizes them."""
    from .files import format_bytes

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no check
        return
    if nbytes > total:
        raise ValueError(f"{what} need about {format_bytes(nbytes)} of memory, more than this "
                         f"machine's {format_bytes(total)}")


def _config(config):
    from .config import ExperimentConfig, load_config

    return config if isinstance(config, ExperimentConfig) else load_config(config)


# ---- generate ------------------------------------------------------------------------------------

def run_generate(config, out, *, n: int | None = None, batch_size: int | None = None,
                 seed: int | None = None, progress: bool = True,
                 part: tuple[int, int] | None = None):
    """Simulate the training set of ``config`` ([training_set] gives the defaults) into ``out``,
    or only its part ``part`` = (I, N), 1-based (``lensbench generate --part I/N``; ``lensbench
    merge`` joins the parts); rerunning finishes an interrupted file. Returns the
    ``dataset.GenerateReport``."""
    from .dataset import Part, generate

    cfg = _config(config)
    ts = cfg.training_set
    n = ts.n_sims if n is None else n
    if part is not None:  # checked against n here, where the message can name the option
        part = Part.split(n, *part, option="--part")
    report = generate(cfg, cfg.prior(), n, out,
                      batch_size=ts.batch_size if batch_size is None else batch_size,
                      seed=ts.seed if seed is None else seed, progress=progress, part=part)
    print(report.summary())
    return report


# ---- training data -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    """The training and held-out (calibration) rows of a sims file's ok simulations."""

    train: np.ndarray
    held_out: np.ndarray


def split_sims(sims, n_calibration: int, n_train: int | None = None) -> Split:
    """The last ``n_calibration`` ok simulations (by file row) are held out; training uses the
    others, or the first ``n_train`` of them (for studies of the training-set size)."""
    n = len(sims)
    if n_calibration >= n:
        raise ValueError(f"{sims.path}: {n} usable simulations, but training_set.n_calibration = "
                         f"{n_calibration} are to be held out; generate more or hold out fewer")
    order = np.argsort(sims.indices, kind="stable")
    train = order[:n - n_calibration]
    if n_train is not None:
        if not 1 <= n_train <= len(train):
            raise ValueError(f"{sims.path}: n_train = {n_train}, but only {len(train)} training "
                             f"simulations are available")
        train = train[:n_train]
    return Split(train, order[n - n_calibration:])


def _read_sims(path):
    from .dataset import read_sims

    sims = read_sims(path)
    if sims.n_pending:
        _log(f"warning: {path} is unfinished ({sims.n_pending} simulations not yet run); using "
             f"the {len(sims)} finished ones (rerun `lensbench generate` to complete it)")
    if sims.n_failed:
        _log(f"note: {path}: {sims.n_failed} failed simulations are excluded")
    if len(sims) == 0:
        raise ValueError(f"{path} holds no finished simulations")
    return sims


def _check_sims_match(sims, cfg) -> None:
    """The sims must be of this configuration's maps and prior."""
    expected = (cfg.bins().n_bins, cfg.maps.npix, cfg.maps.npix) if cfg.maps.sky == "flat" else None
    if cfg.maps.sky != "flat":
        raise ValueError("the implicit pipeline needs flat-sky maps (maps.sky = 'flat')")
    if sims.kappa.shape[1:] != expected:
        raise ValueError(f"{sims.path}: maps of shape {sims.kappa.shape[1:]}, but the configuration "
                         f"{cfg.name!r} makes {expected}")
    if tuple(sims.names) != cfg.prior().names:
        raise ValueError(f"{sims.path}: parameters {', '.join(sims.names)}, but the configuration's "
                         f"prior has {', '.join(cfg.prior().names)}")


# ---- compressor ----------------------------------------------------------------------------------

def run_train_compressor(config, sims_path, out, *, loss: str | None = None,
                         n_train: int | None = None, online: bool | None = None,
                         progress: bool = True):
    """Train a compressor on the training rows of ``sims_path`` (the first ``n_train`` of them
    when given), or online on fresh draws validated on them (``online``, default
    ``compressor.online``); resumes from ``out``'s checkpoints. Returns the
    ``compressors.Compressor``."""
    from compressors import train_compressor

    from .files import check_output_dir

    cfg = _config(config)
    if online is not None:
        cfg = cfg.with_(**{"compressor.online": bool(online)})
    check_output_dir(out, option="--out")
    sims = _read_sims(sims_path)
    _check_sims_match(sims, cfg)
    split = split_sims(sims, cfg.training_set.n_calibration, n_train)
    train_cfg = cfg.compressor.train_config(loss, cfg.scale_cuts(), cfg.maps.field_deg)
    prior = cfg.prior()
    simulate = online_simulator(cfg, prior, train_cfg.batch_size) if train_cfg.online else None
    how = (f"fresh simulations ({train_cfg.batch_size} per step), validated on "
           if train_cfg.online else "")
    _log(f"training a {train_cfg.network} compressor with the {train_cfg.loss} loss on "
         f"{how}{len(split.train)} simulations of {sims_path}")
    comp = train_compressor(sims.kappa[split.train], sims.theta[split.train], sims.sigma_n,
                            train_cfg, out, theta_mean=prior.mean, theta_std=prior.std,
                            param_names=prior.names, progress=progress, simulate=simulate)
    if train_cfg.online:
        print(f"trained on {comp.online_simulations} fresh simulations"
              + (f" ({comp.online_failed} failed, left out)" if comp.online_failed else ""))
    print(f"wrote the compressor to {out} (loss curve {Path(out) / 'loss.png'})")
    return comp


def online_simulator(cfg, prior, batch: int = 1):
    """The configuration's map model as ``(key, index) -> (θ, κ)`` for online training in
    batches of ``batch``.

    Raises ValueError (one line) for a model that cannot run many simulations in one vmapped
    program (a PM run sharded over devices is one simulation across all of them), or a PM batch
    that does not fit in this machine's memory.
    """
    from .dataset import _check_batch_memory, _model_for, _model_sharded, prior_simulator

    model = _model_for(cfg)
    _check_batch_memory(model, batch)
    if _model_sharded(model):
        raise ValueError("compressor.online needs a map model that runs many simulations in one "
                         "vmapped program; this one is sharded over devices (simulation.grid): "
                         "generate a training set instead")
    return prior_simulator(model, prior, cfg.cosmology())


def _noisy(kappa: np.ndarray, theta: np.ndarray, sigma_n: np.ndarray, copies: int, seed: int):
    """θ and noise-free maps repeated ``copies`` times (adjacent), each copy with fresh per-bin
    shape noise drawn from ``seed`` (``estimators.npe.add_noise_copies``)."""
    from estimators.npe import add_noise_copies

    return add_noise_copies(theta, kappa, sigma_n, copies, np.random.default_rng(seed))


def summarise(kind: str, maps: np.ndarray, *, compressor=None, field_deg=None, ell_edges=None,
              scales=None, batch: int = 256) -> np.ndarray:
    """Summaries of noisy maps (n, n_bins, npix, npix): compressor outputs (n, d), C_ℓ data
    vectors (n, n_pairs·n_ell), or the maps themselves (one-stage NPE). ``scales`` (ell_min,
    ell_max per bin; ``ExperimentConfig.scale_cuts``): the C_ℓ vector keeps the ℓ bins inside them
    (``cl_baseline.scale_cut_keep``), the maps lose their Fourier modes outside them; a compressor
    applies the cuts it was trained with itself."""
    if kind == "compressor":
        return np.asarray(compressor.compress(maps), np.float64)
    if kind == "cl":
        import jax

        from estimators.cl_baseline import cl_data_vector, scale_cut_keep

        fn = jax.jit(lambda m: cl_data_vector(m, field_deg, np.asarray(ell_edges)))
        x = np.concatenate([np.asarray(fn(maps[i:i + batch])) for i in range(0, len(maps), batch)])
        keep = scale_cut_keep(maps.shape[1], ell_edges, scales)
        return x if keep is None else x[:, keep]
    if kind == "maps":
        if scales is None:
            return np.asarray(maps, np.float32)
        import jax

        from simulators.flatsky import apply_scale_mask, scale_mask

        mask = scale_mask(field_deg, maps.shape[-1], *scales)
        fn = jax.jit(lambda m: apply_scale_mask(m, mask))
        return np.concatenate([np.asarray(fn(maps[i:i + batch]), np.float32)
                               for i in range(0, len(maps), batch)])
    raise ValueError(f"unknown summary {kind!r}; valid: {', '.join(SUMMARIES)}")


def _summary_settings(cfg, compressor=None) -> dict:
    """``summarise``'s keywords for a configuration: what NPE is fitted on and sampled with."""
    return dict(compressor=compressor, field_deg=cfg.maps.field_deg, ell_edges=cfg.ell_edges(),
                scales=cfg.scale_cuts())


def run_compress(compressor_dir, inputs, out, *, noisy: bool = True, seed: int = 0,
                 overwrite: bool = True) -> Path:
    """Apply a trained compressor to a map file (its noisy maps, or noise-free with noisy=False)
    or to a sims file (noise-free maps plus one shape-noise draw from ``seed`` when noisy).
    Writes HDF5 ``summaries`` (n, d) [+ ``theta``, ``indices`` for sims]."""
    from compressors import load_compressor

    from .files import check_new_output, check_not_inputs, check_output
    from .io import _write_h5, open_h5

    check_output(out, option="--out")
    check_not_inputs(out, {"--in": inputs, "--compressor": compressor_dir})
    check_new_output(out, overwrite=overwrite)
    with open_h5(inputs, "map file or sims file") as f:
        fmt = f.attrs.get("format")
    comp = load_compressor(compressor_dir)
    datasets = {}
    if fmt == "lensbench.maps":
        from .io import read_maps

        m = read_maps(inputs)
        maps = (m.kappa_noisy if noisy else m.kappa)[None]
    elif fmt == "lensbench.sims":
        sims = _read_sims(inputs)
        maps = _noisy(sims.kappa, sims.theta, sims.sigma_n, 1, seed)[1] if noisy else sims.kappa
        datasets.update(theta=(sims.theta, {}), indices=(sims.indices, {}))
    else:
        raise ValueError(f"{inputs} is neither a map file (lensbench maps) nor a sims file "
                         f"(lensbench generate)")
    t = comp.compress(np.asarray(maps, np.float32))
    datasets["summaries"] = (t, {"description": "compressor summaries, (n, summary_dim)"})
    attrs = {"format": "lensbench.summaries", "format_version": 1, "inputs": str(inputs),
             "compressor": str(compressor_dir), "noisy": bool(noisy)}
    path = _write_h5(Path(out), attrs, datasets)
    print(f"wrote {path}: {t.shape[0]} summaries of dimension {t.shape[1]}")
    return path


# ---- NPE -----------------------------------------------------------------------------------------

def run_fit_posterior(config, sims_path, out, *, compressor=None, summary: str | None = None,
                      calibrate: bool = True, n_train: int | None = None,
                      progress: bool = True) -> Path:
    """Fit NPE on summaries of the training rows of ``sims_path``; calibrate on the held-out rows.

    summary: "compressor" (needs ``compressor``, the default when one is given), "cl" or "maps".
    Writes ``out``/npe (the estimator), ``out``/lensbench.json and ``out``/calibration/.
    """
    from estimators.npe import MapEmbedding, compressor_flow_npe, fit_npe

    from .files import check_output_dir

    cfg = _config(config)
    check_output_dir(out, option="--out")
    if summary in ("cl", "maps") and compressor is not None:
        raise ValueError(f"--summary {summary} and --compressor contradict each other: NPE on "
                         f"{'the C_ell data vector' if summary == 'cl' else 'the maps'} uses no "
                         f"compressor; give one of them")
    summary = summary or ("compressor" if compressor is not None else None)
    if summary not in SUMMARIES:
        raise ValueError(f"choose the summary: --compressor DIR, or --summary cl|maps "
                         f"(got {summary!r})")
    if summary == "compressor" and compressor is None:
        raise ValueError("--summary compressor needs --compressor DIR")
    comp = None
    if summary == "compressor":
        from compressors import load_compressor

        comp = load_compressor(compressor)
    sims = _read_sims(sims_path)
    _check_sims_match(sims, cfg)
    split = split_sims(sims, cfg.training_set.n_calibration, n_train)
    npe = cfg.npe
    prior = cfg.prior()
    t0 = time.perf_counter()
    _check_ram(len(split.train) * npe.noise_copies * sims.kappa[0].nbytes,
               f"npe.noise_copies = {npe.noise_copies} noisy copies of {len(split.train)} "
               f"training maps")
    geo = _summary_settings(cfg, comp)
    if npe.vmim_flow and comp is not None and comp.config.loss == "vmim":
        _log(f"NPE: the VMIM compressor's own flow ({comp.n_simulations or '?'} simulations)")
        result = compressor_flow_npe(compressor, prior.torch(), names=prior.names,
                                     n_train=comp.n_simulations or len(split.train),
                                     seed=npe.seed)
    else:
        # noisy copies of the training maps, then their summaries
        theta, maps = _noisy(sims.kappa[split.train], sims.theta[split.train], sims.sigma_n,
                             npe.noise_copies, npe.seed)
        x = summarise(summary, maps, **geo)
        del maps
        embedding = None
        if summary == "maps":
            n_bins, npix = sims.kappa.shape[1], sims.kappa.shape[-1]
            embedding = MapEmbedding(n_bins, npix, n_out=max(8, 2 * prior.dim))
        _log(f"fitting NPE ({npe.density}) on {len(theta)} {summary} summaries "
             f"({len(split.train)} simulations x {npe.noise_copies} noise draws)")
        result = fit_npe(theta, x, prior.torch(), density=npe.density, embedding_net=embedding,
                         seed=npe.seed, max_epochs=npe.max_epochs, batch_size=npe.batch_size,
                         names=prior.names, progress=progress)
    out = Path(out)
    result.save(out / "npe")
    meta = {"summary": summary, "compressor": str(Path(compressor).resolve()) if comp else None,
            "names": list(prior.names), "sims": str(Path(sims_path).resolve()),
            "n_train_sims": int(len(split.train)),
            "noise_copies": None if result.density == "compressor_flow" else npe.noise_copies,
            "density": result.density,
            "fit_time_s": result.fit_time_s, "epochs": result.epochs,
            "best_val_log_prob": result.best_val_log_prob, "config_toml": cfg.to_toml()}
    write_json(out / _META, meta)
    print(f"fitted NPE in {result.fit_time_s:.1f} s ({result.epochs} epochs, best validation "
          f"log q = {result.best_val_log_prob:.3f}); wrote {out}")
    if calibrate and len(split.held_out):
        from estimators.calibration import calibrate as run_calibration

        _, held = _noisy(sims.kappa[split.held_out], sims.theta[split.held_out], sims.sigma_n, 1,
                         npe.seed + 1)
        x_test = summarise(summary, held, **geo)
        cal = run_calibration(result, sims.theta[split.held_out], x_test,
                              n_posterior_samples=npe.calibration_samples,
                              out_dir=out / "calibration", names=prior.names, seed=npe.seed)
        meta["calibration"] = {"tarp_atc": cal["tarp"]["atc"], "tarp_ks_pval": cal["tarp"]["ks_pval"],
                               "sbc_ks_pvals": cal["sbc"]["ks_pvals"],
                               "n_test": cal["n_test"]}
        ks = ", ".join(f"{k} {v:.2f}" for k, v in cal["sbc"]["ks_pvals"].items())
        print(f"calibration on {cal['n_test']} held-out simulations: TARP ATC "
              f"{cal['tarp']['atc']:+.3f} (KS p {cal['tarp']['ks_pval']:.2f}); SBC rank KS p: {ks}; "
              f"plots in {out / 'calibration'}")
    meta["wall_s"] = time.perf_counter() - t0
    write_json(out / _META, meta)
    return out


def _posterior_meta(posterior_dir) -> dict:
    path = Path(posterior_dir) / _META
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {posterior_dir} is not a posterior directory "
                                f"written by `lensbench fit-posterior`")
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or "summary" not in meta:
            raise ValueError("not a posterior description")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable posterior description (the JSON written by "
                         f"`lensbench fit-posterior`): {e}") from None
    return meta


def method_name(summary: str, compressor=None) -> str:
    """npe_<loss> (two-stage with a compressor trained with that loss), npe_cl or npe_maps."""
    return f"npe_{compressor.config.loss}" if summary == "compressor" else f"npe_{summary}"


def run_sample(posterior_dir, maps_path, out, *, n: int | None = None, seed: int = 0,
               overwrite: bool = True):
    """Posterior samples for an observed map file (its noisy maps) -> samples file."""
    from estimators.npe import load_npe

    from .config import MAX_SAMPLES, load_config_text
    from .files import check_new_output, check_not_inputs, check_output, ensure_space
    from .io import Samples, write_samples

    check_output(out, option="--out")
    check_not_inputs(out, {"--maps": maps_path})
    check_new_output(out, overwrite=overwrite)
    if n is not None and not 1 <= int(n) <= MAX_SAMPLES:
        raise ValueError(f"--n must be between 1 and {MAX_SAMPLES} (lensbench's limit), got {n}")
    meta = _posterior_meta(posterior_dir)
    cfg = load_config_text(meta["config_toml"], where=f"{posterior_dir}/{_META}")
    obs = read_observation(cfg, maps_path)  # the configuration the posterior was trained on
    comp = None
    if meta["summary"] == "compressor":
        from compressors import load_compressor

        comp = load_compressor(meta["compressor"])
    x = summarise(meta["summary"], obs.kappa_noisy[None].astype(np.float32),
                  **_summary_settings(cfg, comp))[0]
    post = load_npe(Path(posterior_dir) / "npe")
    n = cfg.npe.n_samples if n is None else int(n)
    ensure_space(out, 8 * n * (len(meta["names"]) + 1), what="the samples file")
    _log(f"drawing {n} samples from {posterior_dir}")
    t0 = time.perf_counter()
    theta = post.sample(x, n, seed=seed)
    truth = [float(obs.attrs[k]) for k in meta["names"]]
    samples = Samples(theta, tuple(meta["names"]), method_name(meta["summary"], comp), truth=truth,
                      info={"posterior": str(posterior_dir), "observation": str(maps_path),
                            "sample_time_s": time.perf_counter() - t0,
                            "n_train_sims": meta["n_train_sims"], "fit_time_s": meta["fit_time_s"],
                            "calibration": meta.get("calibration")},
                      config_toml=meta["config_toml"])
    path = write_samples(out, samples)
    _report_samples(samples, path)
    return samples


def _report_samples(samples, path) -> None:
    mean, std = samples.samples.mean(0), samples.samples.std(0)
    parts = [f"{n} = {m:.4f} ± {s:.4f}" + (f" (truth {t:.4f})" if samples.truth is not None else "")
             for n, m, s, t in zip(samples.names, mean, std,
                                   samples.truth if samples.truth is not None else mean)]
    print(f"{samples.method}: {'; '.join(parts)}; wrote {path}")


# ---- C_ℓ baseline (analytic) ----------------------------------------------------------------------

def cl_data_path(samples_path) -> Path:
    """Where ``run_cl_baseline`` keeps its data vector, theory at the truth and covariance."""
    samples_path = Path(samples_path)
    return samples_path.with_name(samples_path.name + ".data.npz")


def cl_likelihood(cfg, cache: Path | None = None):
    """The configuration's analytic C_ℓ likelihood (``[cl_baseline]``, ``[cl]``, ``[scales]``):
    returns (``ClLikelihood``, covariance (k, k), seconds spent on the covariance). A simulated
    covariance's data vectors are cached in ``cache`` (an .npz) and reused when the configuration
    matches; an analytic one is computed."""
    from estimators.cl_baseline import (ClLikelihood, analytic_covariance, estimate_covariance,
                                        fiducial_data_vectors, scale_cut_keep)
    from simulators.lensing import mesh_power_window, noise_sigma

    if cfg.maps.sky != "flat":
        raise ValueError("the C_ell baseline needs flat-sky maps (maps.sky = 'flat')")
    model = cfg.build_model()
    cb = cfg.cl_baseline
    simulated = cb.covariance == "simulated"
    edges = np.asarray(cfg.ell_edges())
    sigma_n = noise_sigma(model.bins, model.sky)
    window = (mesh_power_window(cfg.simulation.sim_config(sharded=False).cell_size)
              if model.cfg is not None else None)
    # the covariance depends on the maps' model and the ell binning only
    shaping = ("cosmology", "simulation", "lightcone", "shells", "maps", "sources", "cl")
    key = json.dumps({**{k: v for k, v in cfg.to_dict().items() if k in shaping},
                      "n_cov": cb.n_cov, "seed": cb.seed}, sort_keys=True)
    dvs = None
    t0 = time.perf_counter()
    if not simulated:
        cov = analytic_covariance(model.bins, cfg.cosmology(), cfg.maps.field_deg, cfg.maps.npix,
                                  edges, sigma_n, power_filter=window, n_chi=cb.n_chi)
    elif cache is not None and cache.is_file():
        with np.load(cache) as z:
            if str(z["key"]) == key:
                dvs = z["data_vectors"]
    if simulated and dvs is None:
        _log(f"simulating {cb.n_cov} fiducial realisations for the C_ell covariance "
             f"(seeds {cb.seed}..{cb.seed + cb.n_cov - 1})")
        dvs = fiducial_data_vectors(model, cfg.cosmology(), sigma_n, cfg.maps.field_deg, edges,
                                    cb.n_cov, seed=cb.seed, batch=8)
        if cache is not None:
            save_npz(cache, key=key, data_vectors=dvs)
    if simulated:
        cov = estimate_covariance(dvs).cov
    cov_time = time.perf_counter() - t0
    like = ClLikelihood(bins=model.bins, field_deg=cfg.maps.field_deg, npix=cfg.maps.npix,
                        ell_edges=edges, sigma_n=sigma_n, cov=cov,
                        n_cov=cb.n_cov if simulated else None,
                        prior=cfg.prior(), base=cfg.cosmology(), kind=cb.likelihood,
                        power_filter=window, n_chi=cb.n_chi,
                        keep=scale_cut_keep(model.bins.n_bins, edges, cfg.scale_cuts()))
    return like, cov, cov_time


def run_cl_baseline(config, maps_path, out, *, progress: bool = True):
    """The analytic C_ℓ baseline: Gaussian, Sellentin–Heavens or Wishart likelihood of the observed
    noisy maps' binned tomographic C_ℓ, covariance from ``cl_baseline.n_cov`` simulations of the
    configuration's map model at its [cosmology], NUTS over its [prior] -> samples file.
    The covariance's data vectors are cached next to ``out`` (``<out>.cov.npz``) and reused when
    the configuration matches."""
    import jax.numpy as jnp

    from estimators.cl_baseline import cl_data_vector, sample_cl_posterior

    from .io import Samples, write_samples

    cfg = _config(config)
    if cfg.maps.sky != "flat":
        raise ValueError("the C_ell baseline needs flat-sky maps (maps.sky = 'flat')")
    obs = read_observation(cfg, maps_path)
    cb = cfg.cl_baseline
    simulated = cb.covariance == "simulated"
    obs_seed = int(obs.attrs["seed"])
    if simulated and cb.seed <= obs_seed < cb.seed + cb.n_cov:
        raise ValueError(f"the observation's seed {obs_seed} is one of the covariance simulations' "
                         f"seeds [{cb.seed}, {cb.seed + cb.n_cov}): change cl_baseline.seed")
    out = Path(out)
    like, cov, cov_time = cl_likelihood(cfg, out.with_name(out.name + ".cov.npz"))
    edges = np.asarray(like.ell_edges)
    n_cov = like.n_cov
    data = np.asarray(cl_data_vector(jnp.asarray(obs.kappa_noisy), cfg.maps.field_deg, edges))
    theta, info = sample_cl_posterior(like, data, num_warmup=cb.num_warmup,
                                      num_samples=cb.num_samples, num_chains=cb.num_chains,
                                      seed=cb.seed, progress=progress)
    names = cfg.prior().names
    truth = np.array([float(obs.attrs[k]) for k in names])
    # the data vector against the theory at the truth, for the report's C_ell figure
    save_npz(cl_data_path(out), ell_edges=edges, ell=np.asarray(like.ell_mean),
             data=data.reshape(like.n_pairs, -1),
             theory=np.asarray(like.mean(jnp.asarray(truth))).reshape(like.n_pairs, -1),
             noise=np.asarray(like.noise_vector).reshape(like.n_pairs, -1),
             cov=cov, n_cov=-1 if n_cov is None else n_cov, names=np.array(names),
             truth=truth)
    info.update(covariance_time_s=cov_time, n_cov=n_cov, n_simulations=n_cov or 0,
                covariance=cb.covariance, observation=str(maps_path))
    chain = np.repeat(np.arange(cb.num_chains), cb.num_samples)
    samples = Samples(theta, names, "cl_analytic", chain=chain,
                      truth=[float(obs.attrs[k]) for k in names], info=info,
                      config_toml=cfg.to_toml())
    path = write_samples(out, samples)
    source = (f"covariance from {cb.n_cov} simulations, Hartlap factor {like.hartlap:.3f}"
              if simulated else "Wishart band powers" if cb.likelihood == "wishart"
              else "analytic Gaussian covariance")
    print(f"C_ell likelihood: {like.n_data} data ({cb.likelihood}, {source}); NUTS {info['wall_time_s']:.1f} s, "
          f"{info['divergences']} divergences, ESS "
          + ", ".join(f"{k} {v:.0f}" for k, v in info["ess"].items()))
    _report_samples(samples, path)
    return samples


def calibrate_cl_baseline(config, sims_path, out, *, n_grid: int | None = None,
                          progress: bool = False) -> dict:
    """SBC and TARP of the analytic C_ℓ likelihood on the held-out simulations of a training set
    (the last ``training_set.n_calibration``, with shape noise drawn as ``fit-posterior``'s
    calibration draws it): whether the likelihood's model (theory, covariance, distribution)
    describes the maps, which its NUTS diagnostics cannot say. Each posterior is tabulated on one
    grid of n_grid cells per parameter (``cl_baseline.ClGridPosterior``; None: sized by the
    Fisher matrix) and drawn ``npe.calibration_samples`` times. Writes calibration.json, sbc_ranks.png and tarp.png to
    ``out`` and returns the calibration dict (``estimators.calibration.calibrate``'s) with
    "likelihood" and "grid" entries added."""
    from estimators.calibration import calibrate, write_calibration
    from estimators.cl_baseline import ClGridPosterior

    from .files import check_output_dir

    cfg = _config(config)
    out = check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    sims = _read_sims(sims_path)
    _check_sims_match(sims, cfg)
    split = split_sims(sims, cfg.training_set.n_calibration)
    if not len(split.held_out):
        raise ValueError("training_set.n_calibration = 0: no held-out simulations to calibrate on")
    t0 = time.perf_counter()
    like, _, _ = cl_likelihood(cfg, out / "cov.npz")
    _, held = _noisy(sims.kappa[split.held_out], sims.theta[split.held_out], sims.sigma_n, 1,
                     cfg.npe.seed + 1)
    # in float32, as ``calibrate`` hands them to the posterior: the width check below then
    # tabulates the very posteriors that are sampled (the grid keeps them), not near-copies
    data = summarise("cl", held, field_deg=cfg.maps.field_deg,
                     ell_edges=like.ell_edges).astype(np.float32).astype(np.float64)
    grid = ClGridPosterior(like, n_grid=n_grid)
    _log(f"C_ell likelihood ({like.kind}) on a {grid.n_grid}^{cfg.prior().dim} grid; calibrating "
         f"on {len(data)} held-out simulations")
    widths = [grid.posterior(x).diagnostics["cells_per_std"] for x in data]
    cal = calibrate(grid, sims.theta[split.held_out], data,
                    n_posterior_samples=cfg.npe.calibration_samples, names=cfg.prior().names,
                    seed=cfg.npe.seed, progress=progress)
    cal["likelihood"] = {"kind": like.kind, "n_cov": like.n_cov, "n_data": like.n_data,
                         "covariance": cfg.cl_baseline.covariance}
    cal["grid"] = {"n_grid": grid.n_grid, "min_cells_per_std": float(min(widths)),
                   "ranges": [[float(a[0]), float(a[-1])] for a in grid.axes]}
    cal["time_s"] = time.perf_counter() - t0
    write_calibration(cal, out)
    ks = ", ".join(f"{k} {v:.2f}" for k, v in cal["sbc"]["ks_pvals"].items())
    print(f"C_ell likelihood ({like.kind}) on {cal['n_test']} held-out simulations: TARP ATC "
          f"{cal['tarp']['atc']:+.3f} (KS p {cal['tarp']['ks_pval']:.2f}); SBC rank KS p: {ks}; "
          f"wrote {out}")
    return cal


# ---- explicit inference (HMC) ---------------------------------------------------------------------

def read_observation(cfg, maps_path):
    """Read an observed map file and check it fits the configuration's maps: its noisy maps must
    have the configuration's (n_bins, pixels) shape and be finite. Raises ValueError naming both."""
    from .io import read_maps

    obs = read_maps(maps_path)
    bins = cfg.bins()
    flat = cfg.maps.sky == "flat"
    expected = ((bins.n_bins, cfg.maps.npix, cfg.maps.npix) if flat
                else (bins.n_bins, 12 * cfg.maps.nside ** 2))
    if obs.kappa_noisy.shape != expected:
        raise ValueError(f"{maps_path}: observed maps of shape {obs.kappa_noisy.shape}, but the "
                         f"configuration {cfg.name!r} makes {expected} ({bins.n_bins} bins, "
                         f"{'npix ' + str(cfg.maps.npix) if flat else 'nside ' + str(cfg.maps.nside)})")
    if not np.all(np.isfinite(obs.kappa_noisy)):
        raise ValueError(f"{maps_path}: the observed maps contain NaN or inf")
    return obs


def run_hmc(config, maps_path, out, *, samples_out=None, resume: bool = True,
            progress: bool = True, chains=None):
    """Explicit full-field inference on an observed map file: numpyro/blackjax HMC over the
    [prior] parameters and the initial white-noise field, with the [hmc] settings (the PM gradient
    mode is ``hmc.gradient``). Chains, checkpoints and diagnostics go to ``out``; the θ samples
    to ``samples_out`` (default ``out``/samples.h5) in the posterior-samples format.

    ``chains``: run only these chain indices (``explicit.run_hmc``); returns None, writing no
    samples, while other chains of the run are unfinished. Without it, ``hmc.processes`` > 1 runs
    the chains in that many child processes at once (``_chains_in_processes``).

    Under jax.distributed (``jax.distributed.initialize`` called first; every process runs this
    with the same arguments, ``out`` on a shared file system) the field stays split over the
    processes: each writes its own pieces of the start field, sampler state and kept fields, and
    process 0 the shared files."""
    import jax

    from explicit import checkpoint as ckpt
    from explicit import field_model, run_hmc as run_chains
    from simulators.lensing import noise_sigma

    from .io import Samples, write_samples

    from .files import check_output_dir

    cfg = _config(config)
    check_output_dir(out, option="--out")
    if chains is not None:  # before any work: the start field alone takes many seconds
        n = cfg.hmc.num_chains
        bad = [int(c) for c in chains if not 0 <= int(c) < n]
        if bad:
            raise ValueError(f"--chain {bad[0]}: this run has hmc.num_chains = {n}, so chains "
                             f"0 to {n - 1}")
        if not resume:
            raise ValueError("--restart with --chain would delete the other chains' progress: "
                             "restart the whole run without --chain")
    obs = read_observation(cfg, maps_path)
    if cfg.simulation.kind in ("pm", "lpt"):
        cfg = cfg.with_(**{"simulation.gradient": cfg.hmc.gradient})
    model = cfg.build_model()
    prior = cfg.prior()
    sigma_n = noise_sigma(model.bins, model.sky)
    if not np.allclose(sigma_n, obs.sigma_n, rtol=1e-6):
        raise ValueError(f"{maps_path}: its shape-noise rms {obs.sigma_n} differs from the "
                         f"configuration's {sigma_n} (different sources or pixels?)")
    numpyro_model = field_model(model, prior.numpyro_dists(), cfg.cosmology(), obs.kappa_noisy,
                                sigma_n, scales=cfg.scale_cuts())
    settings = cfg.hmc.settings()
    _log(f"{settings.sampler.upper()} over {prior.dim} parameters and the "
         f"{'x'.join(map(str, model.latent_shape))} latent field; {settings.num_chains} chain(s) "
         f"x ({settings.num_warmup} warm-up + {settings.num_samples}) -> {out}")
    processes = min(cfg.hmc.processes, settings.num_chains)
    in_processes = chains is None and processes > 1
    if in_processes:
        if jax.process_count() > 1:
            raise ValueError(f"hmc.processes = {cfg.hmc.processes} runs chains as separate "
                             f"one-process runs; under jax.distributed set it to 1")
        if not resume:
            ckpt.clear_run(Path(out))
    init = {"z": _field_start(numpyro_model, prior.names, Path(out), settings.seed,
                              cfg.hmc.start_steps, resume)}
    if in_processes:
        _chains_in_processes(cfg, settings, Path(maps_path), Path(out), processes, progress)
        resume = True  # the processes ran every chain: what follows reads them
    result = run_chains(numpyro_model, settings, out, theta_names=prior.names, init=init,
                        resume=resume, progress=progress, chains=chains,
                        provenance=_hmc_provenance(cfg, obs))
    if result is None:
        _log(f"chain(s) {', '.join(map(str, chains))} finished; samples are written when every "
             f"chain of {out} is (rerun with the other --chain values, or without --chain)")
        return None
    theta = np.asarray(result.theta, np.float64)  # (chains, samples, d)
    chain = np.repeat(np.arange(theta.shape[0]), theta.shape[1])
    info = dict(result.diagnostics)
    info.update(observation=str(maps_path), chains_dir=str(out), wall_time_s=result.wall_time_s,
                n_gradients=int(result.grad_evals["total"]))
    samples = Samples(theta.reshape(-1, theta.shape[-1]), prior.names, "hmc", chain=chain,
                      truth=[float(obs.attrs[k]) for k in prior.names], info=info,
                      config_toml=cfg.to_toml())
    path = Path(out) / "samples.h5" if samples_out is None else Path(samples_out)
    if ckpt.is_writer():  # one file for all jax.distributed processes
        write_samples(path, samples)
        _report_samples(samples, path)
    ckpt.barrier("lensbench samples")
    return samples




def _hmc_provenance(cfg, obs) -> dict[str, str]:
    """Digests of the observed maps and of the map model's configuration, which a resumed or
    extended HMC run must match (``explicit.run_hmc``'s ``provenance``)."""
    import hashlib

    from explicit import checkpoint as ckpt

    d = cfg.to_dict()
    model = {k: d.get(k) for k in _MODEL_SECTIONS}
    model["simulation"] = {k: v for k, v in (model["simulation"] or {}).items()
                           if k not in _LAYOUT_KEYS}
    inferred = set(cfg.prior().names)  # their [cosmology] values are the truth, not the model
    model["cosmology"] = {k: v for k, v in (model["cosmology"] or {}).items() if k not in inferred}
    text = json.dumps(model, sort_keys=True)
    return {"observation_sha256": ckpt.digest(obs.kappa_noisy),
            "model_config_sha256": hashlib.sha256(text.encode()).hexdigest()}


def _chains_in_processes(cfg, settings, maps_path: Path, out: Path, processes: int,
                         progress: bool) -> None:
    """Run the chains of ``run_hmc`` in ``processes`` child processes (``lensbench hmc --chain``,
    the chains dealt round-robin), after the start field is saved in ``out`` so that none
    recomputes it. Shows the iterations of all chains from their checkpoints (a bar on a
    terminal, else a line each time a segment is done); the children's logs, with their own
    per-segment lines, go to out/logs/process_<i>.log. An interrupted parent stops its children;
    rerunning resumes them."""
    import subprocess

    from explicit import checkpoint as ckpt
    from tqdm import tqdm

    (out / "logs").mkdir(exist_ok=True)
    # next to the logs, not out/config.toml: that may be the user's own (commented) file
    config_file = out / "logs" / "config.toml"
    write_text(config_file, cfg.to_toml())
    groups = [list(range(i, settings.num_chains, processes)) for i in range(processes)]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",  # several may share a GPU
               **{PARENT_PID_ENV: str(os.getpid())})
    cores = _cores_per_process(processes)
    children = []
    logged = 0
    _log(f"{settings.num_chains} chains in {processes} processes (logs in {out / 'logs'})")
    s_dict = settings.to_dict()
    total = settings.num_chains * settings.n_iterations
    lines = progress and not sys.stderr.isatty()  # in a log: a line per finished segment
    bar = tqdm(total=total, disable=not progress or lines, file=sys.stderr, unit="it",
               dynamic_ncols=True)
    try:
        for i, group in enumerate(groups):
            cmd = [sys.executable, "-m", "experiments.cli", "hmc", "--config", str(config_file),
                   "--maps", str(maps_path), "--out", str(out),
                   "--progress" if progress else "--no-progress"]  # per-segment lines, in its log
            for c in group:
                cmd += ["--chain", str(c)]
            log = open(out / "logs" / f"process_{i}.log", "a")
            child_env = env
            if cores:  # CPU: each child on its own cores, its compiled kernels' threads to match
                child_env = dict(env, LENSBENCH_THREADS=str(len(cores[i])),
                                 **{CHILD_CORES_ENV: ",".join(map(str, cores[i]))})
            children.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                              env=child_env), log, group))
        # until all are done, or one fails (the others' checkpoints are kept when stopped)
        while any(p.poll() is None for p, _, _ in children) and \
                not any(p.returncode for p, _, _ in children):
            time.sleep(2.0)
            done = 0
            for c in range(settings.num_chains):
                try:
                    ck = ckpt.load_chain(out, c, s_dict, extend=True, state=False)
                except ckpt.CheckpointError:
                    ck = None  # not written yet
                done += 0 if ck is None else ck.n_rows
            if lines and done > logged:  # (a disabled tqdm does not count: keep our own)
                _log(f"hmc: {done}/{total} iterations over {settings.num_chains} chains")
                logged = done
            bar.update(done - bar.n)
        failed = [(p, log, g) for p, log, g in children if p.returncode]
        if failed:
            p, log, group = failed[0]
            tail = Path(log.name).read_text()[-3000:]
            raise ChildProcessError(f"chain(s) {group} failed (exit {p.returncode}); the end "
                                    f"of {log.name}:\n{tail}")
    finally:
        bar.close()
        for p, log, _ in children:
            if p.poll() is None:
                p.terminate()
                p.wait()
            log.close()


def _cores_per_process(processes: int) -> list[list[int]] | None:
    """On a CPU backend (Linux), this process's cores dealt to ``processes`` children, one share
    each; None elsewhere, or with fewer cores than children. Unpinned, every child's XLA thread
    pool and compiled kernels size themselves to all the cores, and the children slow each other
    down by oversubscribing them."""
    import jax

    if jax.default_backend() != "cpu" or not hasattr(os, "sched_getaffinity"):
        return None
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < processes:
        return None
    return [mine[i::processes] for i in range(processes)]


PARENT_PID_ENV = "LENSBENCH_PARENT_PID"
CHILD_CORES_ENV = "LENSBENCH_CHILD_CORES"


def start_child_process() -> None:
    """In a child process that lensbench started (a chain process of ``_chains_in_processes``,
    or a stage ``compare`` runs in the background; Linux): run on the cores the parent dealt it
    (before JAX sizes its thread pool to them), and get SIGTERM when the parent dies, even by
    SIGKILL, so that a rerun never races orphans on the same files (a chain keeps its last
    checkpoint). Called first thing by ``lensbench hmc`` and ``cl-baseline``; a no-op elsewhere."""
    import ctypes
    import signal

    parent = os.environ.get(PARENT_PID_ENV)
    if parent is None:
        return
    cores = os.environ.get(CHILD_CORES_ENV)
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, [int(c) for c in cores.split(",")])
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (AttributeError, OSError):  # not Linux: the parent's `finally` still stops us
        return
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        raise SystemExit(f"lensbench: parent process {parent} is gone; stopping")


def _field_start(model, names, out: Path, seed: int, steps: int, resume: bool):
    """``explicit.field_start`` (``steps`` Adam steps: ``hmc.start_steps``; 100 bring the quick
    PM objective to within 1 of its optimum, -3236 -> -2953.7 with the last 10 steps gaining 0.5,
    ~30 s on one core), kept in ``out`` so that a resumed run starts from the same field:
    a host array, or, where the field is split over jax.distributed processes, each process's
    pieces (``explicit.checkpoint.save_array``)."""
    from explicit import checkpoint as ckpt
    from explicit import field_start

    path = out / "field_start.npy"
    if resume:
        z = ckpt.load_array(path)
        if z is not None:
            return z
    t0 = time.perf_counter()
    z = field_start(model, names, seed=seed, steps=steps,
                    progress=lambda i, val: _log(f"  start field: step {i}, objective {val:.6g}"))
    if ckpt.is_writer():
        path.unlink(missing_ok=True)  # a stale whole array would shadow new pieces
    ckpt.barrier("lensbench field start")
    ckpt.save_array(path, z)
    _log(f"start field: a draw of p(z | d, theta at the prior mean) by perturb-and-optimise "
         f"({steps} Adam steps, {time.perf_counter() - t0:.0f} s)")
    return z


# ---- exact posterior (Gaussian-field maps) --------------------------------------------------------

def run_exact(config, maps_path, out, *, n: int | None = None, seed: int = 0):
    """The exact posterior of Gaussian-field maps (latent field marginalised analytically, exact
    likelihood of the Fourier modes) on a grid over the 1 or 2 [prior] parameters
    (``explicit.exact.grid_posterior``) -> ``n`` samples (default npe.n_samples) drawn from it."""
    from explicit.exact import grid_posterior
    from simulators.lensing import noise_sigma

    from .io import Samples, write_samples

    cfg = _config(config)
    if cfg.simulation.kind != "gaussian":
        raise ValueError(f"the exact posterior needs Gaussian-field maps (simulation.kind = "
                         f"'gaussian'), not {cfg.simulation.kind!r}")
    prior = cfg.prior()
    if prior.dim > 2:
        raise ValueError(f"the exact grid posterior handles 1 or 2 parameters; the prior has "
                         f"{prior.dim} ({', '.join(prior.names)})")
    obs = read_observation(cfg, maps_path)
    model = cfg.build_model()
    t0 = time.perf_counter()
    post = grid_posterior(model, obs.kappa_noisy, noise_sigma(model.bins, model.sky), prior.names,
                          log_prior=prior.log_prob, base=cfg.cosmology(), scales=cfg.scale_cuts())
    theta = post.sample(seed, cfg.npe.n_samples if n is None else int(n))
    info = {"wall_time_s": time.perf_counter() - t0, "observation": str(maps_path),
            "grid_mean": post.mean, "grid_std": post.std, "log_evidence": post.log_evidence,
            "n_likelihood_evals": post.diagnostics.get("n_evals"),
            "grid_diagnostics": dict(post.diagnostics)}
    samples = Samples(theta, prior.names, "exact", truth=[float(obs.attrs[k]) for k in prior.names],
                      info=info, config_toml=cfg.to_toml())
    path = write_samples(out, samples)
    _report_samples(samples, path)
    return samples
