"""Segmented, checkpointed, resumable HMC runs over (θ, z), and reading them back.

``run_hmc`` runs the chains one after another. Each chain steps in jitted segments of
``settings.segment`` iterations; after every segment the chain file (records so far and the full
sampler state, warm-up adaptation included) is rewritten atomically, so a run killed at any moment
resumes from its last segment with no lost or duplicated samples, and, segment boundaries being
the same, bitwise the same draws as an uninterrupted run. The state is canonicalised through host
numpy after every segment in both cases, so a resumed run feeds the compiled segment exactly the
arrays an uninterrupted one does.

A finished (or interrupted) run is extended by calling ``run_hmc`` again with a larger
``num_samples`` and otherwise the same settings: each chain continues from its saved state, which
gives the draws of one uninterrupted run with the larger ``num_samples``.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint as ckpt
from .checkpoint import CheckpointError, ChainCheckpoint
from .diagnostics import summarize
from .kernels import make_segment, make_stepper
from .model import FIELD_SITE, log_density
from .settings import HMCSettings

Array = jax.Array


@dataclass(frozen=True)
class HMCResult:
    """A finished run.

    Attributes:
      names: the d parameter names.
      theta: (num_chains, num_samples, d) float64 constrained posterior samples.
      potential_energy: (num_chains, num_samples) -log p (unconstrained space).
      diagnostics: the dict written to diagnostics.json (ESS, R̂, divergences, gradient counts...).
      wall_time_s: seconds spent sampling, summed over chains and resumes (compilation included).
      grad_evals: {"warmup", "sampling", "total"} gradient evaluations.
      settings: the run's settings; out_dir: where it lives.
      field_samples: sample indices (0-based, per chain) whose field was kept.
    """

    names: tuple[str, ...]
    theta: np.ndarray
    potential_energy: np.ndarray
    diagnostics: dict
    wall_time_s: float
    grad_evals: dict
    settings: HMCSettings
    out_dir: Path
    field_samples: np.ndarray

    def fields(self, chain: int) -> np.ndarray:
        """(n_kept, *field_shape) kept field samples of ``chain`` (model field dtype), in the
        order of ``field_samples``."""
        if not 0 <= chain < self.settings.num_chains:
            raise ValueError(f"chain must be in [0, {self.settings.num_chains}), got {chain}")
        return np.stack([ckpt.load_field(self.out_dir, chain, int(s)) for s in self.field_samples])


def kept_samples(settings: HMCSettings) -> np.ndarray:
    """Sample indices s (0-based, post warm-up) whose field is kept: every thin_field-th."""
    if settings.thin_field == 0:
        return np.zeros(0, np.int64)
    return np.arange(settings.thin_field - 1, settings.num_samples, settings.thin_field)


def _identity(theta_names, field_site, init, provenance) -> dict:
    """What besides the settings must match for a run to be resumed."""
    init = dict(init or {})
    field = init.pop(field_site, None)
    digest = None if field is None else ckpt.digest(field)
    return {"theta_names": list(theta_names), "field_site": field_site,
            "init": {k: float(v) for k, v in sorted(init.items())}, "init_field_sha256": digest,
            **{str(k): str(v) for k, v in sorted(dict(provenance or {}).items())}}


def _field_like(model, shape) -> bool:
    """Whether the model lays out arrays of this shape like its field (split over devices): such
    arrays stay split over processes on the host, each keeping its pieces."""
    layout = getattr(model, "sharding_for", None)
    return layout is not None and layout(tuple(shape)) is not None


def _host(state, model) -> list:
    """The state's leaves on the host (see ``checkpoint.to_host``)."""
    return [ckpt.to_host(leaf, _field_like(model, leaf.shape)) for leaf in jax.tree.leaves(state)]


def _restore(template, leaves: list, put: Callable, path: Path):
    """Rebuild a state with ``template``'s structure from host leaves, checking shapes/dtypes."""
    t_leaves, treedef = jax.tree.flatten(template)
    if len(leaves) != len(t_leaves):
        raise CheckpointError(f"{path}: the saved sampler state has {len(leaves)} arrays, this run "
                              f"needs {len(t_leaves)} (a different model?); delete it to restart")
    for i, (a, t) in enumerate(zip(leaves, t_leaves)):
        if a.shape != tuple(t.shape) or a.dtype != t.dtype:
            raise CheckpointError(f"{path}: saved state array {i} is {a.dtype}{list(a.shape)}, "
                                  f"expected {t.dtype}{list(t.shape)} (a different model?); "
                                  f"delete it to restart")
    return jax.tree.unflatten(treedef, [put(a) for a in leaves])


def _empty_records(d: int) -> dict:
    return {"theta": np.zeros((0, d)), "potential_energy": np.zeros(0),
            "num_grads": np.zeros(0, np.int64), "diverging": np.zeros(0, bool),
            "accept_prob": np.zeros(0), "step_size": np.zeros(0), "energy_change": np.zeros(0)}


def _segment_inputs(settings: HMCSettings, start: int, first_sample_row: int):
    """Host arrays driving one segment: iteration numbers, active and keep masks, field slots."""
    its = start + np.arange(settings.segment)
    active = its < settings.n_iterations
    s = its - first_sample_row
    keep = active & (s >= 0)
    keep &= ((s + 1) % settings.thin_field == 0) if settings.thin_field else False
    slot = np.maximum(np.cumsum(keep) - 1, 0)
    return its, active, keep, slot, s


def _postfix(ck: ChainCheckpoint, chain: int) -> str:
    r = ck.records
    phase = "warmup" if ck.n_rows <= ck.first_sample_row else "sampling"
    post = slice(ck.first_sample_row, None)
    acc = r["accept_prob"][post] if ck.n_rows > ck.first_sample_row else r["accept_prob"]
    acc_txt = f" acc={np.mean(acc):.2f}" if acc.size and np.all(np.isfinite(acc)) else ""
    eps = r["step_size"][-1] if ck.n_rows else float("nan")
    return (f"chain {chain} {phase} eps={eps:.3g} div={int(r['diverging'].sum())}{acc_txt}")


def _segment_line(ck: ChainCheckpoint, chain: int, n_iter: int, seconds: float, n_new: int) -> str:
    """One progress line per segment, for logs (no terminal to redraw a bar on)."""
    per = seconds / max(n_new, 1)
    left = (n_iter - ck.n_rows) * per
    return (f"hmc {_postfix(ck, chain)}: {ck.n_rows}/{n_iter} iterations, {per:.3g} s/iteration, "
            f"about {left / 60:.1f} min left in this chain")


def run_hmc(model: Callable[[], None], settings: HMCSettings, out_dir, *,
            theta_names, field_site: str = FIELD_SITE, init: Mapping[str, Any] | None = None,
            resume: bool = True, progress: bool = True,
            chains: Sequence[int] | None = None,
            provenance: Mapping[str, str] | None = None) -> HMCResult | None:
    """Sample p(θ, z | d) with NUTS or MCLMC in checkpointed segments (see module docstring).

    Args:
      model: numpyro model with no arguments, scalar sites ``theta_names`` and a field site
        (e.g. ``field_model(...)``). A model with a ``put`` method (``FieldModel``) places
        restored field-shaped state on its device grid.
      settings: ``HMCSettings``.
      out_dir: run directory (created); see ``checkpoint`` for its files.
      theta_names: the parameter sites, in the column order of the returned θ.
      field_site: the latent field site.
      init: constrained start values of θ by name (default: prior mean, else median) and
        optionally the field start under ``field_site`` (shape of the field, or this process's
        ``checkpoint.LocalShards`` of it when the field is split over processes, as
        ``field_start`` returns it there; default FIELD_INIT_SCALE × N(0, 1) per chain, see
        ``model.FIELD_INIT_SCALE``).
      resume: continue the run found in out_dir (False: delete it and start over); with a
        larger ``num_samples`` than it was written with, extend it.
      progress: show a tqdm bar (iterations over all chains; step size, divergences, accept rate)
        on a terminal; elsewhere (a log file) a line per segment, with the time left per chain.
      chains: run only these chains of the run (default: all, one after another). Separate
        processes (or machines sharing ``out_dir``) can run different chains of one run at the same
        time: every chain has its own key and file, so the result equals the sequential run.
      provenance: strings that must also match to resume or extend the run, e.g. digests of
        the observed data and of the model's configuration (the model function itself cannot be
        compared); a run directory written without one of these keys accepts any value of it.
    Returns: ``HMCResult``, and writes out_dir/diagnostics.json, once every chain of the run is
    finished; None while chains outside ``chains`` are not.

    Several processes (``jax.distributed``, the model's device grid spanning them) all call
    ``run_hmc`` with the same arguments and a shared ``out_dir``: each keeps and writes only its
    own pieces of the field-shaped state and kept fields (see ``checkpoint``), and a resume must
    use the same processes and devices.
    Raises: ValueError for invalid arguments; CheckpointError for an unreadable checkpoint or
      one written with other settings, parameters or start.
    """
    from tqdm import tqdm

    if not isinstance(settings, HMCSettings):
        raise ValueError(f"settings must be an HMCSettings, got {type(settings).__name__}")
    theta_names = (theta_names,) if isinstance(theta_names, str) else tuple(theta_names)
    if not theta_names or not all(isinstance(n, str) for n in theta_names):
        raise ValueError(f"theta_names must be a non-empty sequence of site names, got {theta_names!r}")
    if len(set(theta_names)) != len(theta_names) or field_site in theta_names:
        raise ValueError(f"theta_names {theta_names} and field_site {field_site!r} must be distinct")
    unknown = set(init or {}) - set(theta_names) - {field_site}
    if unknown:
        raise ValueError(f"init has unknown site(s) {sorted(unknown)}; valid: "
                         f"{list(theta_names) + [field_site]}")
    if chains is not None:
        chains = sorted({int(c) for c in chains})
        if not chains or not all(0 <= c < settings.num_chains for c in chains):
            raise ValueError(f"chains must be chain indices in [0, {settings.num_chains}), got "
                             f"{chains}")
        if not resume:
            raise ValueError("resume=False with chains would delete the other chains' progress: "
                             "restart the whole run without chains")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s_dict = settings.to_dict()
    identity = _identity(theta_names, field_site, init, provenance)
    run_file = out_dir / "run.json"
    if not resume:
        ckpt.clear_run(out_dir)
    info = ckpt.read_json(run_file)
    if info is not None:
        saved = HMCSettings.with_later_keys(info.get("settings", {}))
        if saved != s_dict and not settings.extends(saved):
            diff = "; ".join(settings.differences(saved))
            raise CheckpointError(f"{run_file} was written with other settings ({diff}); "
                                  f"{ckpt.OTHER_SETTINGS_HINT}")
        saved_id = info.get("identity", {})
        diff = [k for k in identity if saved_id.get(k, identity[k]) != identity[k]]
        if diff:
            raise CheckpointError(f"{run_file} belongs to another run (different {', '.join(diff)}); "
                                  f"use another out_dir or resume=False")
        if saved != s_dict:
            # more samples: the chains continue where they stopped; diagnostics.json is stale
            ckpt.write_json(run_file, {"settings": s_dict, "identity": identity})
            (out_dir / "diagnostics.json").unlink(missing_ok=True)
    else:
        ckpt.write_json(run_file, {"settings": s_dict, "identity": identity})
    ckpt.barrier("lensbench run.json")  # every process reads the chain files after this

    run_these = range(settings.num_chains) if chains is None else chains
    loaded = {c: ckpt.load_chain(out_dir, c, s_dict, extend=True) for c in run_these}
    if not all(ck is not None and ck.complete for ck in loaded.values()):
        _sample(model, settings, out_dir, loaded, theta_names, field_site, init, progress, tqdm)
    if chains is not None:  # the others may be running elsewhere: are they all done?
        others = [ckpt.load_chain(out_dir, c, s_dict, extend=True, state=False)
                  for c in range(settings.num_chains) if c not in loaded]
        if not all(ck is not None and ck.complete for ck in others):
            return None
    return read_chains(out_dir, recompute=True)


@functools.lru_cache(maxsize=2)
def _prepare(model, theta_names, field_site, init_theta, settings: HMCSettings, scale=None):
    """(log-density, stepper, jitted segment) of a run. Cached (keyed on the model object, the
    settings that shape the compiled code and the field preconditioner) so that resuming in the
    same process, e.g. after a KeyboardInterrupt in a notebook, does not recompile a simulation's
    gradient."""
    ld = log_density(model, theta_names, field_site=field_site, init=dict(init_theta))
    if scale is not None:
        ld = ld.preconditioned(scale)
    stepper = make_stepper(model, ld, settings)
    return ld, stepper, make_segment(stepper, settings, getattr(model, "field_dtype", jnp.float64))


# fold_in stream of the preconditioner's probes (chains use 0 .. num_chains - 1)
_SCALE_STREAM = 2**31 - 1


def _chain_keys(seed: int, chain: int) -> tuple[Array, Array]:
    """(key of the chain's start field, key of its sampler) from the run's seed."""
    return tuple(jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), chain)))


def _field_scale(model, settings, out_dir, theta_names, field_site, init, init_theta):
    """The run's ``FourierScale``: read from the run directory, else estimated at chain 0's start
    (``precondition.estimate_scale``) and written there before any chain starts."""
    from .precondition import FourierScale, estimate_scale

    path = Path(out_dir) / ckpt.FIELD_SCALE_FILE
    saved = ckpt.read_json(path)
    if saved is not None:
        try:
            return FourierScale.from_dict(saved)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: not a field preconditioner ({err}); restart the run "
                                  f"(resume=False)") from None
    ld = log_density(model, theta_names, field_site=field_site, init=dict(init_theta))
    k_field, _ = _chain_keys(settings.seed, 0)
    position = ld.init_position(k_field, init.get(field_site))
    key = jax.random.fold_in(jax.random.PRNGKey(settings.seed), _SCALE_STREAM)
    scale = estimate_scale(ld, position, key, sky_fields=getattr(model, "field_on_sky", False))
    ckpt.write_json(path, scale.to_dict())
    ckpt.barrier("lensbench field scale")
    return scale


def _sample(model, settings, out_dir, chains, theta_names, field_site, init, progress, tqdm):
    s_dict = settings.to_dict()
    init = dict(init or {})
    init_theta = tuple(sorted((k, float(v)) for k, v in init.items() if k != field_site))
    # seed, num_samples and num_chains do not enter the compiled code: share it across them
    code_settings = dataclasses.replace(settings, seed=0, num_samples=1, num_chains=1)
    scale = None
    if settings.precondition == "fourier":
        scale = _field_scale(model, settings, out_dir, theta_names, field_site, init, init_theta)
    ld, stepper, segment = _prepare(model, theta_names, field_site, init_theta, code_settings,
                                    scale)
    put = getattr(model, "put", jnp.asarray)
    n_iter = settings.n_iterations
    show = progress and ckpt.is_writer()
    lines = show and not sys.stderr.isatty()  # a redrawn bar would garble a log file
    bar = tqdm(total=len(chains) * n_iter, disable=not show or lines,
               file=sys.stderr, unit="it", dynamic_ncols=True)
    try:
        for c, ck in chains.items():
            if ck is not None and ck.complete:
                bar.update(n_iter)
                continue
            k_field, k_kernel = _chain_keys(settings.seed, c)
            position = ld.init_position(k_field, init.get(field_site))
            path = ckpt.chain_path(out_dir, c)
            if ck is None or ck.leaves is None:
                t0 = time.perf_counter()
                # MCLMC and MAMS tune in long calls before the first checkpoint: say so, and how
                # it went (MAMS also reports each of its stages)
                tunes = show and stepper.first_sample_row == 0
                say = (lambda m, c=c: bar.write(f"hmc chain {c}: {m}", file=sys.stderr)) \
                    if tunes else None
                if tunes:
                    say(f"tuning ({settings.num_warmup} warm-up steps; checkpointed once tuned)")
                state, tuning_grads = stepper.start(k_kernel, position, log=say)
                if tunes:
                    tuned = ", ".join(f"{k} {v:.4g}" for k, v in stepper.tuned(state).items())
                    say(f"tuned in {time.perf_counter() - t0:.0f} s, {tuning_grads} gradients "
                        f"({tuned})")
                leaves = _host(state, model)
                ck = ChainCheckpoint(0, stepper.first_sample_row, tuning_grads,
                                     time.perf_counter() - t0, False, _empty_records(len(theta_names)),
                                     leaves, str(jax.tree.structure(state)), stepper.tuned(state))
                ckpt.save_chain(out_dir, c, ck, s_dict)
                state = _restore(state, leaves, put, path)
            else:
                state = _restore(stepper.template(k_kernel, position), ck.leaves, put, path)
            if ck.records["theta"].shape[1:] != (len(theta_names),):
                raise CheckpointError(f"{path}: records hold {ck.records['theta'].shape[1:]} "
                                      f"parameters, this run has {len(theta_names)}; delete it")
            bar.update(ck.n_rows)
            bar.set_postfix_str(_postfix(ck, c))
            while ck.n_rows < n_iter:
                t0 = time.perf_counter()
                its, active, keep, slot, s = _segment_inputs(settings, ck.n_rows, ck.first_sample_row)
                state, rec, buf = segment(state, jnp.asarray(its), jnp.asarray(active),
                                          jnp.asarray(keep), jnp.asarray(slot))
                n_new = int(active.sum())
                rec = jax.tree.map(lambda a: np.asarray(a)[:n_new], rec)
                if buf is not None:
                    buf = ckpt.to_host(buf, _field_like(model, buf.shape[1:]))
                    for j in np.flatnonzero(keep):
                        ckpt.save_field(out_dir, c, int(s[j]), buf[slot[j]])
                leaves = _host(state, model)
                ck.records = {k: np.concatenate([ck.records[k], rec[k]]) for k in ck.records}
                ck.n_rows += n_new
                ck.complete = ck.n_rows >= n_iter
                ck.leaves = leaves
                ck.wall_s += time.perf_counter() - t0
                ckpt.save_chain(out_dir, c, ck, s_dict)
                state = _restore(state, leaves, put, path)
                bar.update(n_new)
                bar.set_postfix_str(_postfix(ck, c))
                if lines:
                    print(_segment_line(ck, c, n_iter, time.perf_counter() - t0, n_new),
                          file=sys.stderr, flush=True)
    finally:
        bar.close()


def read_chains(out_dir, *, recompute: bool = False) -> HMCResult:
    """Load a finished run from ``out_dir``.

    Diagnostics come from out_dir/diagnostics.json, or are computed from the chain files (and the
    file written) when it is missing or ``recompute`` is set.
    Raises CheckpointError when files are missing, unreadable, or the run is unfinished.
    """
    out_dir = Path(out_dir)
    info = ckpt.read_json(out_dir / "run.json")
    if info is None:
        raise CheckpointError(f"{out_dir}: no run.json; not a run directory (or not started)")
    try:
        settings = HMCSettings(**info["settings"])
        names = tuple(info["identity"]["theta_names"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{out_dir / 'run.json'}: invalid run file ({err}); delete the "
                              f"run directory to restart") from None
    chains = []
    for c in range(settings.num_chains):
        ck = ckpt.load_chain(out_dir, c, settings.to_dict(), state=False)  # records suffice
        if ck is None or not ck.complete:
            done = 0 if ck is None else ck.n_rows
            raise CheckpointError(f"{out_dir}: the run is unfinished (chain {c} has {done} of "
                                  f"{settings.n_iterations} iterations); resume it with run_hmc")
        chains.append(ck)
    post = [slice(ck.first_sample_row, None) for ck in chains]
    theta = np.stack([ck.records["theta"][p] for ck, p in zip(chains, post)])
    pe = np.stack([ck.records["potential_energy"][p] for ck, p in zip(chains, post)])
    warm = [slice(0, ck.first_sample_row) for ck in chains]
    g_warm = np.array([ck.tuning_grads + ck.records["num_grads"][w].sum()
                       for ck, w in zip(chains, warm)])
    g_samp = np.array([ck.records["num_grads"][p].sum() for ck, p in zip(chains, post)])
    diag_file = out_dir / "diagnostics.json"
    diag = None if recompute else ckpt.read_json(diag_file)
    if diag is None:
        extra = {"sampler": settings.sampler, "names": list(names),
                 "tuned": [ck.tuned for ck in chains]}
        diag = summarize(
            names, theta, pe, g_warm, g_samp,
            [ck.records["diverging"][w].sum() for ck, w in zip(chains, warm)],
            [ck.records["diverging"][p].sum() for ck, p in zip(chains, post)],
            [ck.records["step_size"][-1] for ck in chains],
            [np.mean(ck.records["accept_prob"][p]) for ck, p in zip(chains, post)],
            [ck.wall_s for ck in chains], extra)
        ckpt.write_json(diag_file, diag)
    grads = {"warmup": int(g_warm.sum()), "sampling": int(g_samp.sum()),
             "total": int(g_warm.sum() + g_samp.sum())}
    return HMCResult(names, theta, pe, diag, float(sum(ck.wall_s for ck in chains)), grads,
                     settings, out_dir, kept_samples(settings))

