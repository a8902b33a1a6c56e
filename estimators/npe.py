"""Neural posterior estimation (sbi ``NPE``, i.e. NPE-C) on summaries or on maps.

``fit_npe(theta, x, prior)`` trains a conditional flow q(θ | x) on simulations and returns an
``NPEResult`` that samples / evaluates the amortised posterior at any observation and can be
saved and re-loaded (``save`` / ``load_npe``). For maps, pass ``embedding_net=MapEmbedding(...)``:
sbi trains the CNN and the flow together (one-stage NPE).

Shapes: θ (n, d) in the prior's units; x (n, k) summaries or (n, n_bins, npix, npix) maps.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

# density name -> sbi model. "maf" is zuko's MAF: sbi's "maf" (nflows MADE) never lets the
# context reach the first variable of each layer (bayesiains/nflows PR #85), so with few
# parameters a marginal can stay x-independent (seen: 3× too wide on a 2-D Gaussian).
DENSITIES = {"nsf": "nsf", "maf": "zuko_maf", "zuko_nsf": "zuko_nsf", "mdn": "mdn",
             "nflows_maf": "maf"}
_POSTERIOR_FILE = "posterior.pt"
_META_FILE = "npe.json"


class MapEmbedding(nn.Module):
    """CNN summary network: maps (batch, n_bins, npix, npix) → features (batch, n_out).

    Conv(3×3, 'same') + GELU blocks, each followed by 2×2 average pooling while the map is at
    least 2 pixels wide, then global average pooling and a 2-layer MLP head. Global pooling
    makes the features translation invariant, as the statistics of a homogeneous field are.
    Flat inputs (batch, n_bins·npix²) are reshaped, so the net also works on flattened maps.
    Initial weights are drawn from ``seed`` (not the global torch RNG).
    """

    def __init__(self, n_bins: int, npix: int, n_out: int = 8,
                 channels: Sequence[int] = (16, 32, 64), hidden: int = 64, seed: int = 0):
        super().__init__()
        self.n_bins, self.npix, self.n_out = int(n_bins), int(npix), int(n_out)
        self.config = dict(n_bins=self.n_bins, npix=self.npix, n_out=self.n_out,
                           channels=list(channels), hidden=int(hidden), seed=int(seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # initial weights depend on seed only
            self._build(channels, hidden)

    def _build(self, channels: Sequence[int], hidden: int) -> None:
        layers: list[nn.Module] = []
        c_in, size = self.n_bins, self.npix
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GELU()]
            if size >= 2:
                layers.append(nn.AvgPool2d(2))
                size //= 2
            c_in = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(c_in, hidden), nn.GELU(),
                                  nn.Linear(hidden, self.n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.n_bins, self.npix, self.npix)
        if x.dim() == 2 and x.shape[-1] == math.prod(shape):
            x = x.reshape(-1, *shape)
        if tuple(x.shape[-3:]) != shape:
            raise ValueError(f"MapEmbedding: expected maps (batch, {self.n_bins}, {self.npix}, "
                             f"{self.npix}) or flat (batch, {math.prod(shape)}), "
                             f"got {tuple(x.shape)}")
        return self.head(self.features(x))


class CompressorFlowPosterior:
    """The posterior of a VMIM compressor's own flow, q(θ | t), with sbi's posterior interface.

    VMIM trains the flow q(θ | t = f(x)) jointly with the compressor f, on every simulation the
    compressor saw (all of them when trained online); as a posterior it is NPE on the learned
    summary, with no second stage fitted on the (smaller) training set. ``sample``,
    ``sample_batched`` and ``log_prob`` take and return torch tensors like an sbi
    ``DirectPosterior``, so ``NPEResult`` and the calibration use it unchanged. Draws outside the
    prior's support are rejected (the flow is unbounded); ``log_prob`` is the flow's density,
    −inf outside the support and not renormalised for the mass the flow puts there.

    Pickles as the compressor's directory and the prior: the weights are read from the directory
    on first use, so it must stay where it was when the posterior was fitted. Draws follow
    ``torch.manual_seed`` (each summary its own stream), as sbi's do.
    """

    def __init__(self, compressor_dir, prior_torch):
        self.compressor_dir = str(Path(compressor_dir).resolve())
        self.prior = prior_torch
        self._compressor = None

    def __getstate__(self):
        return {**self.__dict__, "_compressor": None}

    @property
    def compressor(self):
        if self._compressor is None:
            from compressors import load_compressor

            comp = load_compressor(self.compressor_dir)
            if comp.config.loss != "vmim":
                raise ValueError(f"{self.compressor_dir} is a {comp.config.loss!r} compressor; "
                                 f"only a VMIM compressor has a flow to use as the posterior")
            self._compressor = comp
        return self._compressor

    def _draw(self, t: np.ndarray, n: int) -> np.ndarray:
        """n draws inside the prior support for each summary t (m, k): (n, m, d)."""
        out = np.empty((n, len(t), self.compressor.n_params), np.float32)
        for j in range(len(t)):
            kept, total, batch = [], 0, n
            for _ in range(1000):
                seed = int(torch.randint(0, 2**31 - 1, ()).item())  # a fresh stream per batch
                draws = self.compressor.flow_sample(t[j:j + 1], batch, seed)[:, 0]
                ok = torch.isfinite(self.prior.log_prob(torch.from_numpy(draws))).numpy()
                kept.append(draws[ok])
                total += int(ok.sum())
                if total >= n:
                    break
                # the last batch's accepted fraction sizes the next (at least n, at most 100 n)
                batch = int(min(100 * n, max(n, (n - total) * batch / max(ok.sum(), 1))))
            else:
                raise ValueError(f"the compressor's flow put almost no mass inside the prior for "
                                 f"summary {j} ({total} of {n} draws accepted)")
            out[:, j] = np.concatenate(kept)[:n]
        return out

    def sample(self, sample_shape, x, show_progress_bars: bool = False) -> torch.Tensor:
        n = int(np.prod(sample_shape))
        return torch.from_numpy(self._draw(np.asarray(x, np.float32).reshape(1, -1), n)[:, 0])

    def sample_batched(self, sample_shape, x, show_progress_bars: bool = False,
                       **_) -> torch.Tensor:
        n = int(np.prod(sample_shape))
        return torch.from_numpy(self._draw(np.asarray(x, np.float32), n))

    def _log_q(self, th: np.ndarray, t: np.ndarray) -> np.ndarray:
        """log q(θ_i | t_i) in θ units for matched rows θ (N, d), t (N, k); −inf outside."""
        comp = self.compressor
        lp = comp.flow_log_prob(th, t) - float(np.sum(np.log(comp.theta_std)))
        inside = torch.isfinite(self.prior.log_prob(torch.from_numpy(th))).numpy()
        return np.where(inside, lp, -np.inf).astype(np.float32)

    def log_prob(self, theta, x, **_) -> torch.Tensor:
        th = np.atleast_2d(np.asarray(theta, np.float32))
        t1 = np.asarray(x, np.float32).reshape(1, -1)    # x: numpy or torch, like sbi's
        t = np.broadcast_to(t1, (len(th), t1.shape[1]))
        return torch.from_numpy(self._log_q(th, np.ascontiguousarray(t)))

    def log_prob_batched(self, theta, x, **_) -> torch.Tensor:
        """θ (s, m, d) against x (m, k) → (s, m)."""
        th = np.asarray(theta, np.float32)
        t = np.asarray(x, np.float32)
        s_, m, d = th.shape
        tt = np.broadcast_to(t[None], (s_, m, t.shape[-1])).reshape(-1, t.shape[-1])
        return torch.from_numpy(self._log_q(th.reshape(-1, d), np.ascontiguousarray(tt))
                                .reshape(s_, m))


@dataclass
class NPEResult:
    """A trained amortised posterior q(θ | x) and a record of its fit.

    Attributes: posterior (sbi ``DirectPosterior``); names (d parameter names); density
    (flow type); x_shape (shape of one observation, e.g. (k,) or (n_bins, npix, npix));
    fit_time_s (wall time of training, s); epochs (epochs trained); best_val_log_prob (best
    mean validation log q(θ|x), nats); n_train (simulations given to sbi, noise copies
    included); seed; history (per-epoch train/validation log-prob).
    """

    posterior: Any
    names: tuple[str, ...]
    density: str
    x_shape: tuple[int, ...]
    fit_time_s: float
    epochs: int
    best_val_log_prob: float
    n_train: int
    seed: int = 0
    history: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return len(self.names)

    # ---- observations ------------------------------------------------------------------------
    def x_batch(self, x: Any, *, single: bool) -> torch.Tensor:
        """x as a float32 tensor with a batch axis; ValueError if its shape does not fit.

        single: x is one observation, shape ``x_shape`` or (1, *x_shape); otherwise a batch
        (m, *x_shape).
        """
        arr = np.asarray(x, dtype=np.float32)
        want = tuple(self.x_shape)
        if single and arr.shape == want:
            arr = arr[None]
        ok = arr.shape[1:] == want and (arr.shape[0] == 1 or not single)
        if not ok:
            expected = f"{want} or {(1, *want)}" if single else f"(m, {', '.join(map(str, want))})"
            raise ValueError(f"x: expected shape {expected}, got {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError("x: contains NaN or inf")
        return torch.from_numpy(np.ascontiguousarray(arr))

    # ---- posterior -----------------------------------------------------------------------------
    def sample(self, x_o: Any, n: int = 1000, seed: int = 0) -> np.ndarray:
        """n posterior samples θ ~ q(θ | x_o): array (n, d), float32, inside the prior support."""
        xt = self.x_batch(x_o, single=True)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            s = self.posterior.sample((int(n),), x=xt, show_progress_bars=False)
        return s.numpy()

    def sample_batched(self, xs: Any, n: int = 1000, seed: int = 0) -> np.ndarray:
        """n samples for each of m observations xs (m, *x_shape): array (n, m, d)."""
        xt = self.x_batch(xs, single=False)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            s = self.posterior.sample_batched((int(n),), x=xt, show_progress_bars=False)
        return s.numpy()

    def log_prob(self, theta: Any, x_o: Any) -> np.ndarray:
        """log q(θ | x_o) for θ (n, d) or (d,): array (n,), nats; −inf outside the prior.

        Normalised to the prior support (sbi estimates the leaked mass by rejection once per
        x_o, so this is exact only up to that Monte-Carlo estimate when mass leaks).
        """
        th = torch.as_tensor(np.atleast_2d(np.asarray(theta, dtype=np.float32)))
        if th.shape[-1] != self.dim:
            raise ValueError(f"theta: expected last dimension {self.dim}, got {tuple(th.shape)}")
        xt = self.x_batch(x_o, single=True)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(self.seed)
            lp = self.posterior.log_prob(th, x=xt)
        return lp.numpy()

    def log_prob_pairs(self, theta: Any, xs: Any) -> np.ndarray:
        """log q(θ_i | x_i) for matched pairs θ (m, d), xs (m, *x_shape): array (m,), nats.

        Vectorised and not renormalised for flow mass outside the prior support (exact when
        the prior is unbounded; otherwise a lower bound by log of the accepted fraction).
        −mean is the NLTP accuracy metric of NPE (Lueckmann et al. 2021).
        """
        th = torch.as_tensor(np.asarray(theta, dtype=np.float32))
        xt = self.x_batch(xs, single=False)
        if th.shape != (xt.shape[0], self.dim):
            raise ValueError(f"theta: expected shape ({xt.shape[0]}, {self.dim}), "
                             f"got {tuple(th.shape)}")
        with torch.no_grad():
            lp = self.posterior.log_prob_batched(th[None], x=xt, norm_posterior=False)
        return lp.reshape(-1).numpy()

    # ---- persistence ------------------------------------------------------------------------
    def meta(self) -> dict:
        return dict(names=list(self.names), density=self.density, x_shape=list(self.x_shape),
                    fit_time_s=self.fit_time_s, epochs=self.epochs,
                    best_val_log_prob=self.best_val_log_prob, n_train=self.n_train,
                    seed=self.seed, history=self.history)

    def save(self, directory: str | Path) -> Path:
        """Write ``posterior.pt`` (the pickled sbi posterior: prior, flow, embedding net) and
        ``npe.json`` (names, density, x shape, fit record) into ``directory``; returns it."""
        from experiments.files import atomic_write, check_output_dir, write_text

        d = check_output_dir(directory)
        atomic_write(d / _POSTERIOR_FILE, lambda tmp: torch.save(self.posterior, tmp))
        write_text(d / _META_FILE, json.dumps(self.meta(), indent=1))
        return d


def load_npe(directory: str | Path) -> NPEResult:
    """Re-load an ``NPEResult`` written by ``NPEResult.save``.

    The posterior is un-pickled (``weights_only=False``): load only files you wrote.
    FileNotFoundError names the missing path.
    """
    d = Path(directory)
    for f in (d / _POSTERIOR_FILE, d / _META_FILE):
        if not f.is_file():
            raise FileNotFoundError(f"NPE posterior: {f} not found (expected files "
                                    f"{_POSTERIOR_FILE} and {_META_FILE} from NPEResult.save)")
    try:
        meta = json.loads((d / _META_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{d / _META_FILE} is not a readable NPE description (the JSON written "
                         f"by fit-posterior): {e}") from None
    try:
        posterior = torch.load(d / _POSTERIOR_FILE, weights_only=False)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise ValueError(f"{d / _POSTERIOR_FILE} is not a readable NPE posterior (the torch file "
                         f"written by fit-posterior; truncated or corrupt?): "
                         f"{' '.join(str(e).split())[:200]}") from None
    return NPEResult(posterior=posterior, names=tuple(meta["names"]), density=meta["density"],
                     x_shape=tuple(meta["x_shape"]), fit_time_s=meta["fit_time_s"],
                     epochs=meta["epochs"], best_val_log_prob=meta["best_val_log_prob"],
                     n_train=meta["n_train"], seed=meta.get("seed", 0),
                     history=meta.get("history", {}))


def compressor_flow_npe(compressor_dir, prior_torch, *, names: Sequence[str], n_train: int,
                        seed: int = 0) -> NPEResult:
    """An ``NPEResult`` whose posterior is a VMIM compressor's own flow
    (``CompressorFlowPosterior``): x is the compressor's summary t; nothing is fitted here."""
    post = CompressorFlowPosterior(compressor_dir, prior_torch)
    comp = post.compressor  # loads it: a missing or non-VMIM compressor fails here
    history = {k: comp.history.get(k, []) for k in ("epoch", "val_loss")}
    # the compressor's validation loss is -log q per unit of standardised θ; sbi's is in θ units
    best = (math.nan if comp.best_val_loss is None
            else -float(comp.best_val_loss) - float(np.sum(np.log(comp.theta_std))))
    return NPEResult(posterior=post, names=tuple(names), density="compressor_flow",
                     x_shape=(comp.summary_dim,), fit_time_s=0.0, epochs=comp.epochs_trained,
                     best_val_log_prob=best, n_train=int(n_train), seed=seed, history=history)


# ---- training ----------------------------------------------------------------------------------
def fit_npe(theta: Any, x: Any, prior_torch: Any, *, density: str = "nsf",
            embedding_net: nn.Module | None = None, seed: int = 0, max_epochs: int = 500,
            batch_size: int = 200, learning_rate: float = 5e-4,
            validation_fraction: float = 0.1, stop_after_epochs: int = 20,
            hidden_features: int = 50, num_transforms: int = 5, z_score_x: str | None = None,
            noise_sigma: Any = None, n_noise_copies: int = 1, names: Sequence[str] | None = None,
            progress: bool = True) -> NPEResult:
    """Train NPE on simulations (θ_i, x_i) and return the amortised posterior.

    theta: (n, d) parameters drawn from ``prior_torch`` (a torch distribution over (d,), e.g.
    ``Prior.torch()``). x: (n, k) summaries or (n, n_bins, npix, npix) maps; maps need an
    ``embedding_net`` such as ``MapEmbedding`` (trained end-to-end with the flow).
    density: "nsf" (sbi's nflows neural spline flow) or "maf" (zuko's masked autoregressive
    flow, see ``DENSITIES``); also "zuko_nsf", "mdn", "nflows_maf" (sbi's own "maf").
    noise_sigma, n_noise_copies: if sigma is given, each simulation is used n_noise_copies times
    with fresh Gaussian noise of std sigma (scalar, per-bin (n_bins,) for maps, or any shape
    broadcasting against one x) — for noise-free stored maps. z_score_x: sbi's x standardising
    ("independent", "structured", "none"); default independent for vectors, structured (one
    mean/std for the whole map) for maps. Training stops after ``stop_after_epochs`` epochs
    without validation improvement or after ``max_epochs`` epochs. Deterministic given
    ``seed`` (and the torch thread count); the global torch RNG state is left untouched.
    progress: sbi's progress bar and convergence message (stdout) when True.

    Raises ValueError for rows with NaN/inf (sbi would hang or silently drop them), mismatched
    lengths, a θ dimension differing from the prior's, or maps without an embedding net.
    """
    from sbi.inference import NPE
    from sbi.neural_nets import posterior_nn

    theta, x = _check_simulations(theta, x, prior_torch)
    if density not in DENSITIES:
        raise ValueError(f"density: expected one of {', '.join(DENSITIES)}, got {density!r}")
    x_shape = tuple(x.shape[1:])
    if x.ndim > 2 and embedding_net is None:
        raise ValueError(f"x: observations of shape {x_shape} need an embedding_net (e.g. "
                         "MapEmbedding) that maps them to a feature vector")
    names = tuple(names or getattr(prior_torch, "names", ()) or
                  (f"theta_{i}" for i in range(theta.shape[1])))

    rng = np.random.default_rng(seed)
    if noise_sigma is not None:
        theta, x = add_noise_copies(theta, x, noise_sigma, n_noise_copies, rng)
    if z_score_x is None:
        z_score_x = "independent" if x.ndim == 2 else "structured"

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # A copy: sbi trains the embedding in place, and the caller's net stays reusable (a
        # second fit from it is then identical). Its initial weights are the caller's.
        embed = nn.Identity() if embedding_net is None else copy.deepcopy(embedding_net)
        builder = posterior_nn(model=DENSITIES[density], embedding_net=embed, z_score_x=z_score_x,
                               hidden_features=hidden_features, num_transforms=num_transforms)
        trainer = NPE(prior=prior_torch, density_estimator=builder,
                      show_progress_bars=progress, tracker=_NullTracker())
        t0 = time.perf_counter()
        trainer.append_simulations(torch.from_numpy(theta), torch.from_numpy(x))
        quiet = contextlib.nullcontext() if progress else contextlib.redirect_stdout(io.StringIO())
        with quiet:  # sbi prints "converged after N epochs" even without progress bars
            estimator = trainer.train(training_batch_size=batch_size,
                                      learning_rate=learning_rate,
                                      validation_fraction=validation_fraction,
                                      stop_after_epochs=stop_after_epochs,
                                      # sbi runs epochs 0..max_num_epochs inclusive
                                      max_num_epochs=max(int(max_epochs) - 1, 0))
        fit_time = time.perf_counter() - t0
        posterior = trainer.build_posterior(estimator)
    estimator.eval()

    summary = trainer.summary
    history = {"train_log_prob": [-float(v) for v in summary["training_loss"]],
               "val_log_prob": [-float(v) for v in summary["validation_loss"]]}
    return NPEResult(posterior=posterior, names=names, density=density, x_shape=x_shape,
                     fit_time_s=fit_time, epochs=int(summary["epochs_trained"][-1]),
                     best_val_log_prob=-float(summary["best_validation_loss"][-1]),
                     n_train=int(theta.shape[0]), seed=seed, history=history)


def add_noise_copies(theta: np.ndarray, x: np.ndarray, sigma: Any, copies: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Repeat each (θ_i, x_i) ``copies`` times and add fresh N(0, σ²) noise to every copy.

    sigma: scalar, (n_bins,) per tomographic bin when x is maps (n, n_bins, npix, npix), or any
    array broadcasting against x.shape[1:]. Returns θ (n·copies, d), x (n·copies, ...) float32.
    Copies of one simulation are adjacent; sbi's random train/validation split then puts some
    copies of a training simulation in validation (a mildly optimistic validation loss).
    """
    if int(copies) < 1:
        raise ValueError(f"n_noise_copies must be >= 1, got {copies}")
    sig = np.asarray(sigma, dtype=np.float32)
    if x.ndim == 4 and sig.ndim == 1 and sig.shape[0] == x.shape[1]:
        sig = sig[:, None, None]  # per-bin σ on maps
    try:
        np.broadcast_shapes(sig.shape, x.shape[1:])
    except ValueError:
        raise ValueError(f"noise_sigma: shape {sig.shape} does not broadcast against one x of "
                         f"shape {x.shape[1:]}") from None
    if (sig < 0).any() or not np.isfinite(sig).all():
        raise ValueError("noise_sigma must be finite and >= 0")
    theta_rep = np.repeat(theta, copies, axis=0)
    x_rep = np.repeat(x, copies, axis=0)
    x_rep += (rng.standard_normal(x_rep.shape, dtype=np.float32) * sig).astype(np.float32)
    return theta_rep, x_rep


def _check_simulations(theta: Any, x: Any, prior_torch: Any) -> tuple[np.ndarray, np.ndarray]:
    theta = np.asarray(theta, dtype=np.float32)
    x = np.asarray(x, dtype=np.float32)
    if theta.ndim != 2:
        raise ValueError(f"theta: expected shape (n, d), got {theta.shape}")
    if x.ndim < 2 or x.shape[0] != theta.shape[0]:
        raise ValueError(f"x: expected shape (n={theta.shape[0]}, ...), got {x.shape}")
    d = int(prior_torch.event_shape[0]) if len(prior_torch.event_shape) else 1
    if theta.shape[1] != d:
        raise ValueError(f"theta: has {theta.shape[1]} parameters, the prior {d}")
    bad = ~(np.isfinite(theta).all(axis=1) & np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    if bad.any():
        idx = np.flatnonzero(bad)
        raise ValueError(f"{idx.size} of {len(x)} simulations have NaN or inf in theta or x "
                         f"(rows {idx[:10].tolist()}{' ...' if idx.size > 10 else ''}); "
                         "drop or fix them before fit_npe")
    return theta, x


class _NullTracker:
    """sbi tracker that records nothing (the default writes TensorBoard logs to ./sbi-logs)."""

    log_dir = None

    def log_metric(self, name, value, step=None):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_params(self, params):
        pass

    def add_figure(self, name, figure, step=None):
        pass

    def flush(self):
        pass
