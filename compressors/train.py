"""Training, checkpointing, resuming and loading of map → summary compressors.

``train_compressor(maps, theta, sigma_n, config, out_dir)`` trains a network (and, for VMIM, a
conditional flow) on noise-free maps (n, n_bins, npix, npix) with parameters θ (n, d) and writes
to ``out_dir``:

- ``run.json``: the configuration and a fingerprint of the data, so that a second call on the same
  directory can tell a resume (same config and data) from a mistake (anything else → ValueError);
- ``checkpoints/<epoch>/``: orbax checkpoints after every epoch (params, optimizer state, best
  params, RNG key, and a JSON part with the epoch, best validation loss, patience counter and
  history); the last two are kept;
- ``history.json`` and ``loss.png``: per-epoch train/validation loss, learning rate and the number
  of simulations trained on so far;
- ``compressor.json`` + ``compressor.msgpack``: the final model (best-validation params, config,
  θ standardisation, parameter names, input shape, sigma_n, map normalisation), read back by
  ``load_compressor``.

Online training (``TrainConfig.online``): every training batch is drawn fresh from the simulator
(``simulate(key, index) -> (θ, maps)``, jitted and vmapped over the batch), so the network never
sees a map twice and the training set is only the validation set and the input normalisation.
Every draw counts in the run's simulation budget (``Compressor.n_simulations``).

Determinism: the train/validation split, the initial params, the validation noise and every
epoch's shuffling, noise, symmetries and online draws are functions of (seed, epoch, step) only,
so a run interrupted after epoch k and resumed reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from experiments.config import CompressorSection
from experiments.files import save_figure, write_bytes, write_text

from . import losses as L
from .augment import add_shape_noise, augment_batch
from .flow import ConditionalFlow
from .flow import sample as sample_flow
from .networks import NETWORKS, build_network

__all__ = ["TrainConfig", "Compressor", "train_compressor", "load_compressor"]

LR_SCHEDULES = ("cosine", "constant")
RUN_JSON = "run.json"
MODEL_JSON = "compressor.json"
MODEL_PARAMS = "compressor.msgpack"
CHECKPOINTS = "checkpoints"

# Independent RNG streams derived from the seed (fold_in indices).
_STREAM_INIT, _STREAM_VAL_NOISE, _STREAM_EPOCHS, _STREAM_FIXED_TRAIN_NOISE = 0, 1, 2, 3
# Online draws: a threefry key of (seed, this tag), apart from every stream above and from the
# training set's own seeds (lensbench generate keys its simulations by training_set.seed).
_ONLINE_TAG = 0x6F6E6C6E


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

def _configured(name: str):
    """The default of the [compressor] key of that name (docs/configuration.md), so that training
    from Python and from a configuration agree unless told otherwise."""
    return CompressorSection.model_fields[name].default


@dataclass(frozen=True)
class TrainConfig:
    """How to train a compressor (hashable; every field is part of a run's identity).

    Defaults suit ~1000 maps of (3, 64, 64) on a CPU; those of the keys a configuration sets are
    the [compressor] section's (``experiments.config.CompressorSection``).

    Attributes:
      loss: "mse" | "mae" | "gnll" | "vmim" (see ``compressors.losses``).
      network: "resnet" | "cnn" | "power" (the band powers alone through an MLP).
      width: channels of the first convolution stage.
      depth: ResNet stages / CNN convolutions; each after the first halves the resolution.
      blocks: residual blocks per ResNet stage (ignored by "cnn").
      head_hidden: width of the MLP head's hidden layer.
      power_bands: > 0: the head also sees the maps' band powers in at most this many annuli of
        the FFT grid (``networks.band_power_features``); the "power" network needs >= 1.
      summary_dim: VMIM only: size of the summary t (default: d, the number of parameters).
      epochs: maximum number of epochs (early stopping may end sooner).
      steps_per_epoch: optimiser steps per epoch, the unit of validation, early stopping, the
        learning-rate schedule and checkpoints. None: one pass over the training split
        (n_train // batch_size). A fixed value makes the optimisation budget (epochs ×
        steps_per_epoch) the same for every training-set size, a small set being cycled several
        times per epoch: with one-pass epochs, 1,000 maps and 100 epochs of batch 128 give 800
        steps, and VMIM stops far from its optimum (NOTEBOOK 22).
      batch_size: maps per optimisation step (capped at the training-set size).
      learning_rate: peak AdamW learning rate.
      lr_schedule: "cosine" (linear warm-up, then cosine decay to 1% over all epochs) or
        "constant" (linear warm-up, then constant).
      warmup_epochs: epochs of linear warm-up from 0 (0 disables); must be < epochs.
      weight_decay: AdamW decoupled weight decay, applied to kernels only (not biases/norms).
      grad_clip: global gradient-norm clip (None disables).
      val_fraction: fraction of the maps held out for validation (at least one map each side).
      patience: stop after this many epochs without a lower validation loss (None: never).
      seed: seeds the split, initialisation, noise, shuffling and symmetries.
      augment: True: fresh shape noise and a random D4 symmetry for every map in every batch.
        False: one fixed noise realisation per training map and no symmetries.
      ema: None, or the decay of an exponential moving average of the parameters per step
        (time constant 1 / (1 - ema) steps, bias-corrected): validation, early stopping and
        the saved model then use the average, which smooths the step-to-step noise of the
        parameters (the noisy VMIM validation loss of a plain run).
      online: True: every training batch is ``batch_size`` fresh simulations from the
        ``simulate`` function given to ``train_compressor`` (an epoch is as many steps as the
        fixed training split would give); the fixed maps serve for validation and normalisation
        only. Needs ``augment`` (the fresh maps get fresh noise).
      flow_layers, flow_hidden: VMIM only: autoregressive layers and hidden width of q(θ | t).
      scales, field_deg: scale cuts: None, or ((ell_min per bin), (ell_max per bin)) with the
        maps' side in degrees: the network sees every map (training, validation, compression)
        with its Fourier modes outside these multipoles removed (``flatsky.apply_scale_mask``,
        after the shape noise is added), so it uses exactly the scales the other methods use.
    """

    loss: str = _configured("loss")
    network: str = _configured("network")
    width: int = _configured("width")
    depth: int = _configured("depth")
    blocks: int = 1
    head_hidden: int = 64
    power_bands: int = _configured("power_bands")
    summary_dim: int | None = None
    epochs: int = _configured("epochs")
    steps_per_epoch: int | None = None
    batch_size: int = _configured("batch_size")
    learning_rate: float = _configured("learning_rate")
    lr_schedule: str = "cosine"
    warmup_epochs: int = 1
    weight_decay: float = 1e-4
    grad_clip: float | None = 1.0
    val_fraction: float = _configured("val_fraction")
    patience: int | None = _configured("patience")
    seed: int = _configured("seed")
    augment: bool = True
    ema: float | None = None
    online: bool = False
    flow_layers: int = _configured("flow_layers")
    flow_hidden: int = _configured("flow_hidden")
    scales: tuple | None = None
    field_deg: float | None = None

    def __post_init__(self):
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"TrainConfig.{name} must be one of {tuple(options)}, "
                                 f"got {getattr(self, name)!r}")

        def integer(name, low, allow_none=False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {low}"
                                 f"{' or None' if allow_none else ''}, got {value!r}")

        def real(name, low, high=math.inf, allow_none=False, open_low=False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
            ok = ok and math.isfinite(value) and (value > low if open_low else value >= low)
            if not (ok and value < high):
                lo = "(" if open_low else "["
                raise ValueError(f"TrainConfig.{name} must be a number in {lo}{low}, {high})"
                                 f"{' or None' if allow_none else ''}, got {value!r}")

        choice("loss", L.LOSSES)
        choice("network", NETWORKS)
        choice("lr_schedule", LR_SCHEDULES)
        for name in ("width", "depth", "blocks", "head_hidden", "epochs", "batch_size",
                     "flow_layers", "flow_hidden"):
            integer(name, 1)
        integer("summary_dim", 1, allow_none=True)
        integer("steps_per_epoch", 1, allow_none=True)
        integer("power_bands", 1 if self.network == "power" else 0)
        integer("warmup_epochs", 0)
        integer("patience", 1, allow_none=True)
        integer("seed", 0)
        real("learning_rate", 0.0, open_low=True)
        real("weight_decay", 0.0)
        real("grad_clip", 0.0, open_low=True, allow_none=True)
        real("val_fraction", 0.0, 1.0, open_low=True)
        real("ema", 0.0, 1.0, open_low=True, allow_none=True)
        for name in ("augment", "online"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name} must be True or False, "
                                 f"got {getattr(self, name)!r}")
        if self.online and not self.augment:
            raise ValueError("TrainConfig.online needs augment=True: fresh simulations need "
                             "fresh shape noise")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"TrainConfig.warmup_epochs ({self.warmup_epochs}) must be < epochs "
                             f"({self.epochs})")
        if self.scales is not None:
            try:
                lo, hi = (tuple(float(v) for v in part) for part in self.scales)
            except (TypeError, ValueError):
                raise ValueError(f"TrainConfig.scales must be (ell_min per bin, ell_max per bin), "
                                 f"got {self.scales!r}") from None
            if len(lo) != len(hi) or not lo:
                raise ValueError("TrainConfig.scales: ell_min and ell_max need one value per bin")
            object.__setattr__(self, "scales", (lo, hi))
            if not (isinstance(self.field_deg, (int, float)) and 0 < self.field_deg < 90):
                raise ValueError(f"TrainConfig.scales needs field_deg (the maps' side in degrees), "
                                 f"got {self.field_deg!r}")
            object.__setattr__(self, "field_deg", float(self.field_deg))
        if self.summary_dim is not None and self.loss != "vmim":
            raise ValueError("TrainConfig.summary_dim only applies to loss='vmim' (the other "
                             f"losses output one number per parameter), got {self.summary_dim}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        # models written before these existed
        data = {"online": False, "ema": None, "power_bands": 0, "steps_per_epoch": None, **data}
        if data.get("scales") is not None:  # JSON lists -> the hashable tuples of a static config
            data["scales"] = tuple(tuple(float(v) for v in part) for part in data["scales"])
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        return cls(**data)

    def network_kwargs(self) -> dict[str, int]:
        if self.network == "power":
            return dict(power_bands=self.power_bands, head_hidden=self.head_hidden)
        kw = dict(width=self.width, depth=self.depth, head_hidden=self.head_hidden,
                  power_bands=self.power_bands)
        if self.network == "resnet":
            kw["blocks"] = self.blocks
        return kw


# --------------------------------------------------------------------------------------------
# Compiled programs (cached per configuration so repeated calls, e.g. a resume, reuse them)
# --------------------------------------------------------------------------------------------

class _Program(NamedTuple):
    net: Any
    flow: ConditionalFlow | None
    optimizer: optax.GradientTransformation
    schedule: Any
    init: Any           # (key, input_shape) → (params, opt_state); static input_shape
    train_step: Any
    eval_losses: Any


# One-off programs (initialisation, fixed noise draws): compile time dominates their run time,
# so skip LLVM's optimisation passes (halves their compile time on CPU).
_ONE_OFF = {"xla_backend_optimization_level": 0}
_add_noise = jax.jit(add_shape_noise, compiler_options=_ONE_OFF)
# "rbg" keys draw bits with XLA's RngBitGenerator; threefry's integer arithmetic takes several
# times longer to compile on CPU, which dominates small runs. rbg streams are deterministic on a
# given backend and JAX version (enough for exact resumes), not across versions.
_PRNG_IMPL = "rbg"


def _normalise(maps, map_mean, map_std):
    return (maps - map_mean[None, :, None, None]) / map_std[None, :, None, None]


@functools.lru_cache(maxsize=16)
def _scale_mask(config: "TrainConfig", npix: int) -> np.ndarray | None:
    """The Fourier modes the network sees (``TrainConfig.scales``), or None: all of them."""
    if config.scales is None:
        return None
    from simulators.flatsky import scale_mask

    return scale_mask(config.field_deg, npix, *config.scales)


def _cut(config: "TrainConfig", maps):
    """Noisy maps (n, n_bins, npix, npix) as the network sees them: scale-cut, if configured."""
    mask = _scale_mask(config, int(maps.shape[-1]))
    if mask is None:
        return maps
    from simulators.flatsky import apply_scale_mask

    return apply_scale_mask(maps, mask)


def _modules(config: TrainConfig, d: int):
    n_out = L.n_outputs(config.loss, d, config.summary_dim)
    net = build_network(config.network, n_out, **config.network_kwargs())
    flow = (ConditionalFlow(dim=d, n_layers=config.flow_layers, hidden=config.flow_hidden)
            if config.loss == "vmim" else None)
    return net, flow


def _per_map_loss(config: TrainConfig, net, flow, params, x, y):
    """Per-map loss (batch,) on normalised maps x and standardised parameters y."""
    out = net.apply({"params": params["net"]}, x)
    if config.loss == "vmim":
        return L.vmim(flow.apply({"params": params["flow"]}, y, out))
    return L.HEAD_LOSSES[config.loss](out, y)


def _schedule(config: TrainConfig, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch
    lr = config.learning_rate
    if config.lr_schedule == "cosine":
        if warmup == 0:
            return optax.cosine_decay_schedule(lr, total, alpha=0.01)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end_value=0.01 * lr)
    if warmup == 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.constant_schedule(lr)], [warmup])


def _fast_compile(config: TrainConfig, maps_per_epoch: int, input_shape) -> bool:
    """Skip LLVM's optimisation passes for the training programs of small runs.

    They cost seconds of compile time and buy ~10% of step time, which pays off only when a run
    trains on more than ~1e7 pixel-maps (epochs × maps per epoch × bins × pixels) — the default
    64² problem is well above, unit-test-sized problems far below. A function of the config and
    data shape only, so a resumed run compiles the same programs.
    """
    return config.epochs * maps_per_epoch * math.prod(input_shape) < 10_000_000


@functools.lru_cache(maxsize=16)
def _program(config: TrainConfig, d: int, steps_per_epoch: int, fast_compile: bool = False
             ) -> _Program:
    net, flow = _modules(config, d)
    jit = functools.partial(jax.jit, compiler_options=_ONE_OFF if fast_compile else None)
    schedule = _schedule(config, steps_per_epoch)
    # Decay kernels only: shrinking biases towards 0 is not a useful regulariser.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip else []
    parts.append(optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask))
    optimizer = optax.chain(*parts)
    loss_fn = functools.partial(_per_map_loss, config, net, flow)

    @jit
    def train_step(params, opt_state, ema, maps, y, weight, key, sigma_n, map_mean, map_std):
        # weight (batch,) in {0, 1}: 0 drops a failed online simulation from the mean loss
        x = augment_batch(key, maps, sigma_n, symmetries=config.augment)
        x = _normalise(_cut(config, x), map_mean, map_std)

        def mean_loss(p):
            per_map = jnp.where(weight > 0, loss_fn(p, x, y), 0.0)
            return jnp.sum(per_map) / jnp.maximum(jnp.sum(weight), 1.0)

        loss, grads = jax.value_and_grad(mean_loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if config.ema is not None:
            ema = jax.tree.map(lambda e, p: config.ema * e + (1 - config.ema) * p, ema, params)
        return params, opt_state, ema, loss

    @jit
    def eval_losses(params, noisy_maps, y, map_mean, map_std):
        return loss_fn(params, _normalise(_cut(config, noisy_maps), map_mean, map_std), y)

    @functools.partial(jax.jit, static_argnums=1, compiler_options=_ONE_OFF)
    def init(key, input_shape):
        # Under jit: eager initialisers would compile one small program per parameter.
        k_net, k_flow = jax.random.split(key)
        params = {"net": net.init(k_net, jnp.zeros((1, *input_shape), jnp.float32))["params"]}
        if flow is not None:
            t_dim = L.n_outputs("vmim", d, config.summary_dim)
            params["flow"] = flow.init(k_flow, jnp.zeros((1, d)), jnp.zeros((1, t_dim)))[
                "params"]
        return params, optimizer.init(params)

    return _Program(net, flow, optimizer, schedule, init, train_step, eval_losses)


@functools.lru_cache(maxsize=16)
def _flow_fn(config: TrainConfig, d: int):
    """jit'ed (flow params, y (n, d), t (n, summary_dim)) → log q(y | t) (n,)."""
    _, flow = _modules(config, d)
    return jax.jit(lambda p, y, t: flow.apply({"params": p}, y, t))


@functools.lru_cache(maxsize=16)
def _flow_sample_fn(config: TrainConfig, d: int, n: int):
    """jit'ed (flow params, key, t (m, summary_dim)) → y (n, m, d): n flow draws per summary."""
    _, flow = _modules(config, d)

    def draws(p, key, t):
        keys = jax.random.split(key, t.shape[0])
        one = lambda k, c: sample_flow(flow, p, k, c, n)  # noqa: E731
        return jnp.swapaxes(jax.vmap(one)(keys, t), 0, 1)

    return jax.jit(draws)


@functools.lru_cache(maxsize=16)
def _apply_fn(config: TrainConfig, d: int):
    """jit'ed (net params, maps, map_mean, map_std) → raw outputs (batch, n_out)."""
    net, _ = _modules(config, d)
    return jax.jit(lambda p, maps, m, s: net.apply({"params": p},
                                                   _normalise(_cut(config, maps), m, s)))


def _batched(fn, n: int, batch: int, *arrays):
    """fn over row-chunks of ``arrays`` with one compiled shape: the tail chunk is zero-padded.

    Returns the concatenated (n, …) outputs.
    """
    outs = []
    for start in range(0, n, batch):
        chunk = [a[start:start + batch] for a in arrays]
        m = chunk[0].shape[0]
        if m < batch:
            chunk = [np.concatenate([c, np.zeros((batch - m, *c.shape[1:]), c.dtype)])
                     for c in chunk]
        outs.append(np.asarray(fn(*chunk))[:m])
    return np.concatenate(outs)


def _online_draw(simulate, batch: int, theta_mean, theta_std, input_shape):
    """jit'ed key → (maps (batch, *input_shape) float32, y (batch, d) standardised, weight
    (batch,)): ``batch`` fresh simulations ``simulate(key, 0..batch-1)``. A draw with a
    non-finite θ or map is zeroed (so no NaN reaches the gradient) and gets weight 0.

    Raises ValueError (one line) when ``simulate`` cannot be traced, jitted and vmapped, or
    returns shapes other than (d,) and ``input_shape``.
    """
    d = len(theta_mean)
    mean, std = jnp.asarray(theta_mean, jnp.float32), jnp.asarray(theta_std, jnp.float32)
    batched = jax.vmap(simulate, in_axes=(None, 0))
    index = jnp.arange(batch, dtype=jnp.uint32)
    try:
        theta, maps = jax.eval_shape(batched, jax.random.key(0), index)
    except Exception as err:  # anything tracing raises: the one line names the model's failure
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"online training needs a simulator that can be jitted and vmapped; "
                         f"this one cannot ({type(err).__name__}: {first})") from None
    if maps.shape != (batch, *input_shape) or theta.shape != (batch, d):
        raise ValueError(f"the online simulator gives θ {theta.shape[1:]} and maps "
                         f"{maps.shape[1:]}, the training data θ ({d},) and maps "
                         f"{tuple(input_shape)}")

    def draw(key):
        theta, maps = batched(key, index)
        theta, maps = theta.astype(jnp.float32), maps.astype(jnp.float32)
        ok = jnp.isfinite(maps).reshape(batch, -1).all(1) & jnp.isfinite(theta).all(1)
        maps = jnp.where(ok[:, None, None, None], maps, 0.0)
        y = jnp.where(ok[:, None], (theta - mean) / std, 0.0)
        return maps, y, ok.astype(jnp.float32)

    return jax.jit(draw)


def _online_draws(config: TrainConfig, epochs: int, steps_per_epoch: int, batch: int) -> int:
    """Fresh simulations drawn in ``epochs`` epochs of online training (0 for fixed data)."""
    return epochs * steps_per_epoch * batch if config.online else 0


# --------------------------------------------------------------------------------------------
# The trained model
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Compressor:
    """A trained compressor: maps (n, n_bins, npix, npix) → summaries (n, summary_dim).

    Attributes:
      config: the TrainConfig it was trained with.
      params: {"net": ..., "flow": ...} (flow only for VMIM), best-validation values, numpy.
      theta_mean, theta_std: (d,) standardisation of θ used in training (θ units).
      param_names: d names.
      input_shape: (n_bins, npix_y, npix_x) of the training maps.
      sigma_n: (n_bins,) shape-noise rms (map units) added in training.
      map_mean, map_std: (n_bins,) input normalisation (noisy training maps, per bin).
      history: per-epoch "epoch", "train_loss", "val_loss", "lr", "seconds" and "simulations":
        what the network has trained on by the end of that epoch, online (``config.online``,
        ``compressor.online = true``) the fresh draws so far, else the fixed training split.
      best_val_loss, best_epoch: lowest validation loss and its (1-based) epoch.
      epochs_trained: epochs run so far; complete: False if training can still be resumed.
      n_simulations: simulations this compressor cost: the maps given (training and
        validation) plus, online, every fresh draw (None: written before this was recorded).
      online_simulations: fresh draws trained on online (0 for fixed-data training).
      online_failed: online draws left out because their θ or maps were not finite.
    """

    config: TrainConfig
    params: dict
    theta_mean: np.ndarray
    theta_std: np.ndarray
    param_names: tuple[str, ...]
    input_shape: tuple[int, int, int]
    sigma_n: np.ndarray
    map_mean: np.ndarray
    map_std: np.ndarray
    history: dict
    best_val_loss: float | None
    best_epoch: int | None
    epochs_trained: int
    complete: bool
    n_simulations: int | None = None
    online_simulations: int = 0
    online_failed: int = 0

    @property
    def n_params(self) -> int:
        return len(self.theta_mean)

    @property
    def summary_dim(self) -> int:
        return self.n_params if self.config.loss != "vmim" else L.n_outputs(
            "vmim", self.n_params, self.config.summary_dim)

    def _check_maps(self, maps) -> np.ndarray:
        maps = np.asarray(maps, dtype=np.float32)
        if maps.ndim != 4 or maps.shape[1:] != tuple(self.input_shape):
            raise ValueError(f"expected maps shaped (n, {', '.join(map(str, self.input_shape))})"
                             f" as in training, got {maps.shape}")
        return maps

    def raw_outputs(self, maps, batch_size: int = 256) -> np.ndarray:
        """Network outputs (n, n_out) for noisy maps, in standardised-θ units (see losses)."""
        maps = self._check_maps(maps)
        if maps.shape[0] == 0:
            return np.zeros((0, L.n_outputs(self.config.loss, self.n_params,
                                            self.config.summary_dim)), np.float32)
        fn = _apply_fn(self.config, self.n_params)
        apply = functools.partial(fn, self.params["net"], m=self.map_mean, s=self.map_std)
        return _batched(lambda x: apply(x), maps.shape[0], min(batch_size, maps.shape[0]), maps)

    def compress(self, maps, batch_size: int = 256) -> np.ndarray:
        """Summaries of maps (n, n_bins, npix, npix) → (n, summary_dim), float32.

        The maps must already contain shape noise (like observed data); none is added here.
        mse/mae/gnll: the estimate of θ in θ units (the de-standardised mean).
        vmim: the raw summary t (no units; it is the context of the flow q(θ | t)).
        """
        out = self.raw_outputs(maps, batch_size)
        mean = L.point_estimate(self.config.loss, out, self.n_params)
        if self.config.loss == "vmim":
            return mean
        return (mean * self.theta_std + self.theta_mean).astype(np.float32)

    def flow_log_prob(self, theta, summaries) -> np.ndarray:
        """VMIM only: log q(θ | t) (n,) in nats per unit of *standardised* θ, for θ (n, d) in θ
        units and t (n, summary_dim) from ``compress``; subtract Σ log theta_std for θ units."""
        if self.config.loss != "vmim":
            raise ValueError(f"flow_log_prob needs a VMIM compressor, this one is "
                             f"{self.config.loss!r}")
        y = (np.asarray(theta, np.float32) - self.theta_mean) / self.theta_std
        t = np.asarray(summaries, np.float32)
        if y.ndim != 2 or t.ndim != 2 or y.shape[0] != t.shape[0]:
            raise ValueError(f"theta (n, {self.n_params}) and summaries (n, {self.summary_dim}) "
                             f"need the same n, got {y.shape} and {t.shape}")
        return np.asarray(_flow_fn(self.config, self.n_params)(self.params["flow"], y, t))

    def flow_sample(self, summaries, n: int, seed: int = 0) -> np.ndarray:
        """VMIM only: n draws θ ~ q(θ | t) (θ units) for each of m summaries (m, summary_dim)
        from ``compress``: array (n, m, d), float32. Unbounded: the caller restricts them to
        the prior's support."""
        if self.config.loss != "vmim":
            raise ValueError(f"flow_sample needs a VMIM compressor, this one is "
                             f"{self.config.loss!r}")
        t = np.asarray(summaries, np.float32)
        if t.ndim != 2 or t.shape[1] != self.summary_dim:
            raise ValueError(f"summaries must be (m, {self.summary_dim}), got {t.shape}")
        fn = _flow_sample_fn(self.config, self.n_params, int(n))
        y = np.asarray(fn(self.params["flow"], jax.random.key(seed, impl=_PRNG_IMPL), t))
        return (y * self.theta_std + self.theta_mean).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Input checks and bookkeeping
# --------------------------------------------------------------------------------------------

def _check_data(maps, theta, sigma_n):
    maps = np.asarray(maps, dtype=np.float32)
    theta = np.asarray(theta, dtype=np.float32)
    sigma_n = np.asarray(sigma_n, dtype=np.float32).reshape(-1)
    if maps.ndim != 4:
        raise ValueError(f"maps must be (n, n_bins, npix, npix), got shape {maps.shape}")
    if theta.ndim != 2 or theta.shape[0] != maps.shape[0]:
        raise ValueError(f"theta must be (n, d) with n = {maps.shape[0]} maps, got {theta.shape}")
    if sigma_n.shape != (maps.shape[1],):
        raise ValueError(f"sigma_n must have one rms per bin, shape ({maps.shape[1]},), "
                         f"got {np.shape(sigma_n)}")
    if not np.all(np.isfinite(sigma_n)) or np.any(sigma_n < 0):
        raise ValueError(f"sigma_n must be finite and >= 0, got {sigma_n}")
    for name, arr in (("maps", maps), ("theta", theta)):
        bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)
            raise ValueError(f"{name} contain NaN or inf in {rows.size} of {arr.shape[0]} rows "
                             f"(first rows: {rows[:5].tolist()}); drop or fix them first")
    return maps, theta, sigma_n


def _split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n_val = int(round(val_fraction * n))
    if n_val < 1 or n - n_val < 1:
        raise ValueError(f"val_fraction={val_fraction} of {n} maps leaves an empty training or "
                         "validation set; use more maps or another val_fraction")
    perm = np.random.default_rng([seed, 7919]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _fingerprint(*arrays) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _check_run_record(out_dir: Path, record: dict) -> None:
    """Write run.json, or check that the one there describes the same run."""
    path = out_dir / RUN_JSON
    if not path.exists():
        write_text(path, json.dumps(record, indent=1))
        return
    old = json.loads(path.read_text())
    try:  # a record written before a field existed holds that field's default
        old["config"] = TrainConfig.from_dict(old.get("config") or {}).to_dict()
    except (TypeError, ValueError):
        pass  # not a TrainConfig: the comparison below names the difference
    if old.get("config") != record["config"]:
        diff = {k: (old.get("config", {}).get(k), v) for k, v in record["config"].items()
                if old.get("config", {}).get(k) != v}
        raise ValueError(f"{out_dir} holds a run with a different TrainConfig (field: (old, new) "
                         f"= {diff}); resume with the same config or use another out_dir")
    if old.get("data") != record["data"]:
        raise ValueError(f"{out_dir} holds a run on different data or θ standardisation "
                         f"({old.get('data')} vs {record['data']}); use another out_dir")


def _write_history(out_dir: Path, history: dict) -> None:
    write_text(out_dir / "history.json", json.dumps(history, indent=1))


def _plot_history(out_dir: Path, history: dict, loss: str, best_epoch: int | None) -> None:
    # Figure + Agg canvas directly: no pyplot, so no global backend switch in the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(history["epoch"], history["train_loss"], "o-", ms=3, label="train (augmented)")
    ax.plot(history["epoch"], history["val_loss"], "s-", ms=3, label="validation")
    if best_epoch is not None:
        ax.axvline(best_epoch, color="0.6", ls=":", lw=1, label=f"best (epoch {best_epoch})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{loss} loss" + (" [nats]" if loss in ("gnll", "vmim") else ""))
    if min(history["train_loss"] + history["val_loss"], default=1.0) > 0:
        ax.set_yscale("log")
    ax.legend()
    save_figure(fig, out_dir / "loss.png", dpi=110)


def _checkpoint_manager(out_dir: Path) -> ocp.CheckpointManager:
    # Synchronous saves: the state is small, and a save must be complete before the next epoch
    # for "interrupt anywhere, resume" to hold.
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(out_dir / CHECKPOINTS, options=options,
                                 item_names=("state", "meta"))


def _write_model(out_dir: Path, comp: Compressor) -> None:
    meta = {
        "config": comp.config.to_dict(),
        "theta_mean": comp.theta_mean.tolist(), "theta_std": comp.theta_std.tolist(),
        "param_names": list(comp.param_names), "input_shape": list(comp.input_shape),
        "sigma_n": comp.sigma_n.tolist(), "map_mean": comp.map_mean.tolist(),
        "map_std": comp.map_std.tolist(), "best_val_loss": comp.best_val_loss,
        "best_epoch": comp.best_epoch, "epochs_trained": comp.epochs_trained,
        "complete": comp.complete, "n_simulations": comp.n_simulations,
        "online_simulations": comp.online_simulations, "online_failed": comp.online_failed, "history": comp.history,
    }
    write_bytes(out_dir / MODEL_PARAMS, flax.serialization.msgpack_serialize(comp.params))
    write_text(out_dir / MODEL_JSON, json.dumps(meta, indent=1))


def load_compressor(out_dir: str | Path) -> Compressor:
    """The model written by ``train_compressor`` to ``out_dir``.

    Raises FileNotFoundError naming the path if the directory or the model files are missing.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"no compressor directory at {out_dir}")
    for name in (MODEL_JSON, MODEL_PARAMS):
        if not (out_dir / name).is_file():
            raise FileNotFoundError(f"{out_dir} holds no trained compressor ({out_dir / name} "
                                    "is missing); run train_compressor with this out_dir first")
    try:
        meta = json.loads((out_dir / MODEL_JSON).read_text())
        if not isinstance(meta, dict) or "config" not in meta:
            raise ValueError("not a compressor description")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{out_dir / MODEL_JSON} is not a readable compressor description "
                         f"(the JSON written by train-compressor): {e}") from None
    try:
        params = flax.serialization.msgpack_restore((out_dir / MODEL_PARAMS).read_bytes())
    except (ValueError, TypeError) as e:  # msgpack's errors (truncated, corrupt) are ValueErrors
        raise ValueError(f"{out_dir / MODEL_PARAMS} is not readable compressor weights (the "
                         f"msgpack file written by train-compressor; truncated or corrupt?): "
                         f"{e}") from None
    f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
    return Compressor(
        config=TrainConfig.from_dict(meta["config"]), params=params,
        theta_mean=f32(meta["theta_mean"]), theta_std=f32(meta["theta_std"]),
        param_names=tuple(meta["param_names"]), input_shape=tuple(meta["input_shape"]),
        sigma_n=f32(meta["sigma_n"]), map_mean=f32(meta["map_mean"]),
        map_std=f32(meta["map_std"]), history=meta["history"],
        best_val_loss=meta["best_val_loss"], best_epoch=meta["best_epoch"],
        epochs_trained=meta["epochs_trained"], complete=meta["complete"],
        n_simulations=meta.get("n_simulations"),
        online_simulations=meta.get("online_simulations", 0),
        online_failed=meta.get("online_failed", 0))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def train_compressor(maps, theta, sigma_n, config: TrainConfig, out_dir: str | Path, *,
                     theta_mean=None, theta_std=None, param_names: Sequence[str] | None = None,
                     progress: bool = True, max_epochs_this_call: int | None = None,
                     simulate: Callable | None = None) -> Compressor:
    """Train (or resume training) a compressor and write it to ``out_dir``.

    Args:
      maps: (n, n_bins, npix_y, npix_x) noise-free maps (e.g. convergence), float.
      theta: (n, d) parameters of each map.
      sigma_n: (n_bins,) per-pixel shape-noise rms, same units as the maps; a fresh realisation
        is added to every training batch, one fixed realisation to the validation maps.
      config: TrainConfig.
      out_dir: directory for checkpoints, history, loss plot and the final model. If it holds
        checkpoints of the same run (same config and data), training resumes from the last one.
      theta_mean, theta_std: (d,) standardisation of θ (θ units); default: the training split's
        mean and standard deviation.
      param_names: d names (default "theta_0", ...).
      progress: show a tqdm bar over epochs with the train/validation losses.
      max_epochs_this_call: run at most this many more epochs, then checkpoint and return (the
        returned model is marked incomplete; call again to continue).
      simulate: online training only (``config.online``): a pure, jittable
        ``(key, index) -> (θ (d,), maps (n_bins, npix_y, npix_x))`` drawing θ from the prior and
        one noise-free map set, e.g. ``experiments.dataset.prior_simulator``. It is vmapped over
        the batch; a draw with non-finite θ or maps is left out of the loss and counted.

    Returns:
      the Compressor with the best-validation parameters so far.

    Raises:
      ValueError: bad shapes, NaN/inf rows in maps or θ, too few maps for the split, or an
        out_dir holding a different run.
      FloatingPointError: the training loss became non-finite (lower the learning rate).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if max_epochs_this_call is not None and int(max_epochs_this_call) < 1:
        raise ValueError(f"max_epochs_this_call must be >= 1 or None, got {max_epochs_this_call}")
    maps, theta, sigma_n = _check_data(maps, theta, sigma_n)
    n, d = theta.shape
    input_shape = tuple(int(s) for s in maps.shape[1:])
    train_idx, val_idx = _split(n, config.val_fraction, config.seed)

    theta_mean = (theta[train_idx].mean(0) if theta_mean is None
                  else np.asarray(theta_mean, np.float32)).astype(np.float32)
    theta_std = (theta[train_idx].std(0) if theta_std is None
                 else np.asarray(theta_std, np.float32)).astype(np.float32)
    if theta_mean.shape != (d,) or theta_std.shape != (d,):
        raise ValueError(f"theta_mean and theta_std must have shape ({d},), got "
                         f"{theta_mean.shape} and {theta_std.shape}")
    if not (np.all(np.isfinite(theta_std)) and np.all(theta_std > 0)
            and np.all(np.isfinite(theta_mean))):
        raise ValueError(f"theta_std must be finite and > 0 (a parameter that never varies "
                         f"cannot be learned), got mean {theta_mean}, std {theta_std}")
    param_names = (tuple(f"theta_{i}" for i in range(d)) if param_names is None
                   else tuple(str(p) for p in param_names))
    if len(param_names) != d:
        raise ValueError(f"param_names needs {d} names, got {len(param_names)}")

    if config.online != (simulate is not None):
        raise ValueError("online training needs a simulate function, and only online training "
                         f"takes one (config.online={config.online}, simulate "
                         f"{'given' if simulate is not None else 'missing'})")

    seed_key = jax.random.key(config.seed, impl=_PRNG_IMPL)
    y = ((theta - theta_mean) / theta_std).astype(np.float32)
    train_maps, y_train = maps[train_idx], y[train_idx]
    val_maps = np.asarray(_add_noise(jax.random.fold_in(seed_key, _STREAM_VAL_NOISE),
                                     maps[val_idx], sigma_n))
    step_sigma = sigma_n
    if not config.augment:
        # No augmentation: the training set is one fixed noisy realisation.
        train_maps = np.asarray(_add_noise(
            jax.random.fold_in(seed_key, _STREAM_FIXED_TRAIN_NOISE), train_maps, sigma_n))
        step_sigma = np.zeros_like(sigma_n)
    # Per-bin input normalisation of the noisy maps as the network sees them: mean, and
    # sqrt(signal var + noise var), the noise var times the fraction of modes the cuts keep.
    seen = np.asarray(_cut(config, maps[train_idx]))
    mask = _scale_mask(config, int(maps.shape[-1]))
    kept = np.ones(maps.shape[1]) if mask is None else mask.mean(axis=(1, 2))
    map_mean = seen.mean(axis=(0, 2, 3)).astype(np.float32)
    map_std = np.sqrt(seen.var(axis=(0, 2, 3)) + kept * sigma_n**2).astype(np.float32)
    del seen
    map_std = np.where(map_std > 0, map_std, 1.0).astype(np.float32)

    n_train = len(train_idx)
    # Unless the config fixes it, an epoch is one pass over the split, without the remainder
    # (one compiled batch shape); online, as many fresh batches as that pass would give.
    batch = config.batch_size if config.online else min(config.batch_size, n_train)
    steps_per_epoch = config.steps_per_epoch or max(1, n_train // batch)
    maps_per_epoch = n_train if config.steps_per_epoch is None else steps_per_epoch * batch
    # the epoch's batches: as many passes over the split, each in a fresh order, as it needs
    passes = -(-steps_per_epoch * batch // n_train)
    draw = (_online_draw(simulate, batch, theta_mean, theta_std, input_shape)
            if config.online else None)
    online_key = jax.random.fold_in(jax.random.key(config.seed), _ONLINE_TAG)
    ones = np.ones(batch, np.float32)
    program = _program(config, d, steps_per_epoch,
                       _fast_compile(config, maps_per_epoch, input_shape))

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_run_record(out_dir, {
        "config": config.to_dict(),
        "data": {"n": n, "d": d, "input_shape": list(input_shape),
                 "fingerprint": _fingerprint(maps, theta, sigma_n, theta_mean, theta_std)}})

    # Fresh state; also the restore target that gives orbax the pytree structure and dtypes.
    params, opt_state = program.init(jax.random.fold_in(seed_key, _STREAM_INIT), input_shape)
    state = {"params": params, "opt_state": opt_state,
             "best_params": params, "key": jax.random.key_data(seed_key)}
    if config.ema is not None:  # the running sum of the average, from 0 (bias-corrected)
        state["ema"] = jax.tree.map(jnp.zeros_like, params)
    meta = {"epoch": 0, "best_val": None, "best_epoch": None, "wait": 0, "stopped": False,
            "online_failed": 0,
            "history": {"epoch": [], "train_loss": [], "val_loss": [], "lr": [], "seconds": [],
                        "simulations": []}}

    mngr = _checkpoint_manager(out_dir)
    try:
        last = mngr.latest_step()
        if last is not None:
            restored = mngr.restore(last, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(state), meta=ocp.args.JsonRestore()))
            state, meta = dict(restored["state"]), dict(restored["meta"])
            # checkpoints written before the simulation count was kept (fixed-data runs)
            meta.setdefault("online_failed", 0)
            meta["history"].setdefault("simulations", [n_train] * len(meta["history"]["epoch"]))
        base_key = jax.random.wrap_key_data(state["key"], impl=_PRNG_IMPL)
        epoch_key = jax.random.fold_in(base_key, _STREAM_EPOCHS)
        params, opt_state, ema = state["params"], state["opt_state"], state.get("ema")
        history = meta["history"]

        stop = config.epochs
        if max_epochs_this_call is not None:
            stop = min(stop, meta["epoch"] + int(max_epochs_this_call))
        bar = tqdm(total=config.epochs, initial=meta["epoch"], desc=f"{config.loss} compressor",
                   unit="epoch", disable=not progress or meta["stopped"], dynamic_ncols=True)
        with bar:
            for epoch in range(meta["epoch"], stop):
                if meta["stopped"]:
                    break
                t0 = time.perf_counter()
                key = jax.random.fold_in(epoch_key, epoch)
                rng = np.random.default_rng([config.seed, epoch])
                perm = np.concatenate([rng.permutation(n_train) for _ in range(passes)])
                step_losses = []
                failed = []
                for step in range(steps_per_epoch):
                    if draw is not None:
                        batch_maps, batch_y, weight = draw(
                            jax.random.fold_in(online_key, epoch * steps_per_epoch + step))
                        failed.append(batch - jnp.sum(weight))
                    else:
                        idx = perm[step * batch:(step + 1) * batch]
                        batch_maps, batch_y, weight = train_maps[idx], y_train[idx], ones
                    params, opt_state, ema, loss = program.train_step(
                        params, opt_state, ema, batch_maps, batch_y, weight,
                        jax.random.fold_in(key, step), step_sigma, map_mean, map_std)
                    step_losses.append(loss)
                train_loss = float(np.mean(jax.device_get(step_losses)))
                meta["online_failed"] += int(sum(jax.device_get(failed)))
                if not math.isfinite(train_loss):
                    raise FloatingPointError(
                        f"training loss became {train_loss} in epoch {epoch + 1}; lower "
                        f"learning_rate (now {config.learning_rate}) or check the inputs")
                judged = params if ema is None else jax.tree.map(
                    lambda e: e / (1 - config.ema ** ((epoch + 1) * steps_per_epoch)), ema)
                per_map = _batched(functools.partial(program.eval_losses, judged,
                                                     map_mean=map_mean, map_std=map_std),
                                   len(val_idx), min(batch, len(val_idx)), val_maps,
                                   y[val_idx])
                val_loss = float(np.mean(per_map.astype(np.float64)))

                history["epoch"].append(epoch + 1)
                history["train_loss"].append(train_loss)
                history["val_loss"].append(val_loss)
                history["lr"].append(float(program.schedule((epoch + 1) * steps_per_epoch)))
                history["seconds"].append(time.perf_counter() - t0)
                history["simulations"].append(
                    # what the network has trained on: the fresh draws, or the fixed split
                    _online_draws(config, epoch + 1, steps_per_epoch, batch) if config.online
                    else n_train)
                if meta["best_val"] is None or val_loss < meta["best_val"]:
                    meta.update(best_val=val_loss, best_epoch=epoch + 1, wait=0)
                    state["best_params"] = judged
                else:
                    meta["wait"] += 1
                if config.patience is not None and meta["wait"] >= config.patience:
                    meta["stopped"] = True
                meta["epoch"] = epoch + 1
                state.update(params=params, opt_state=opt_state)
                if ema is not None:
                    state["ema"] = ema
                mngr.save(epoch + 1, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
                _write_history(out_dir, history)
                bar.update(1)
                bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}",
                                best=f"{meta['best_val']:.4g}",
                                **({"sims": history["simulations"][-1]} if config.online else {}))
        mngr.wait_until_finished()
    finally:
        mngr.close()

    drawn = _online_draws(config, meta["epoch"], steps_per_epoch, batch)
    comp = Compressor(
        config=config, params=jax.tree.map(np.asarray, state["best_params"]),
        theta_mean=theta_mean, theta_std=theta_std, param_names=param_names,
        input_shape=input_shape, sigma_n=sigma_n, map_mean=map_mean, map_std=map_std,
        history=history, best_val_loss=meta["best_val"], best_epoch=meta["best_epoch"],
        epochs_trained=meta["epoch"], complete=meta["stopped"] or meta["epoch"] >= config.epochs,
        n_simulations=n + drawn, online_simulations=drawn, online_failed=meta["online_failed"])
    _write_history(out_dir, history)
    if history["epoch"]:
        _plot_history(out_dir, history, config.loss, meta["best_epoch"])
    _write_model(out_dir, comp)
    return comp
