"""compressors: losses learn, the flow density is normalised, resume == uninterrupted, bad input.

Kept small for a shared 2-core CPU: 256 maps of 8×8 pixels in 2 bins, a 2-layer CNN of width 4,
and every training run of one loss shares one compiled program (the resume test reuses the mse
one).
"""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressors import LOSSES, ConditionalFlow, TrainConfig, load_compressor, train_compressor
from compressors.augment import add_shape_noise, random_dihedral
from compressors.losses import gnll, gnll_split
from compressors.train import _fast_compile, _online_draw, _program

N_MAPS, N_BINS, NPIX = 256, 2, 8


def _key(seed):
    # rbg keys, as in training: threefry's bit generator takes seconds to compile on CPU.
    return jax.random.key(seed, impl="rbg")


# The test programs run once on small inputs: skip LLVM optimisation (halves compile time).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
SIGMA_N = np.array([0.1, 0.1], np.float32)


def _toy_data(seed=0):
    """θ = (amplitude, bump height) ~ U(-1, 1)², both D4-invariant in their effect on the maps
    (so the random symmetries of the augmentation keep the information)."""
    rng = np.random.default_rng(seed)
    theta = rng.uniform(-1, 1, (N_MAPS, 2)).astype(np.float32)
    x = np.linspace(-1, 1, NPIX)
    bump = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / 0.3)
    field = rng.normal(size=(N_MAPS, N_BINS, NPIX, NPIX))
    b = np.arange(N_BINS)[None, :, None, None]
    a, h = theta[:, 0, None, None, None], theta[:, 1, None, None, None]
    maps = a * (1 + 0.5 * b) * (1 + 0.3 * field) + h * (-1.0) ** b * bump
    return maps.astype(np.float32), theta


def _config(loss, **kw):
    return TrainConfig(loss=loss, network="cnn", width=4, depth=2, head_hidden=16, epochs=6,
                       batch_size=16, learning_rate=1e-2, lr_schedule="cosine",
                       warmup_epochs=0, val_fraction=0.25, patience=None, flow_layers=2,
                       flow_hidden=8, **kw)


@pytest.fixture(scope="module")
def data():
    return _toy_data()


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """loss → (Compressor, out_dir), trained once per module."""
    cache = {}

    def get(loss):
        if loss not in cache:
            out = tmp_path_factory.mktemp(f"run_{loss}")
            maps, theta = data
            comp = train_compressor(maps, theta, SIGMA_N, _config(loss), out,
                                    param_names=("A", "h"), progress=False)
            cache[loss] = comp, out
        return cache[loss]

    return get


# ---------------------------------------------------------------------------------------------
# 1. every loss learns
# ---------------------------------------------------------------------------------------------

# A network that learns nothing stays at the "predict the prior" level in every epoch: for
# standardised θ ~ U(-√3, √3)² that is mse 1, mae √3/2 ≈ 0.87, gnll 0.5·d·log(2πe) ≈ 2.84 nats
# (best θ-independent Gaussian) and vmim d·log(2√3) ≈ 2.49 nats (the uniform itself, the best a
# flow can do without information). Observed after 6 epochs: mse 0.63 → 0.47 (val 0.48),
# mae 0.60 → 0.45 (0.46), gnll 2.87 → 1.00 (1.15), vmim 2.76 → 0.82 (0.69) nats.
# Required: the last epoch's train loss below the first by DROP (about half the observed drop;
# epoch 1 already includes learning, hence small mse/mae margins) and the last validation loss
# below the no-information level by a margin well above its sampling noise (≈ 0.05 for 64
# validation maps).
DROP = {"mse": 0.08, "mae": 0.08, "gnll": 0.9, "vmim": 1.0}
NO_INFO = {"mse": 1.0, "mae": math.sqrt(3) / 2, "gnll": math.log(2 * math.pi * math.e),
           "vmim": 2 * math.log(2 * math.sqrt(3))}


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_decreases(loss, trained, data):
    comp, out = trained(loss)
    hist = comp.history
    assert hist["epoch"] == list(range(1, 7))
    assert hist["train_loss"][-1] < hist["train_loss"][0] - DROP[loss], hist["train_loss"]
    margin = 0.25 if loss in ("mse", "mae") else 0.6
    assert hist["val_loss"][-1] < NO_INFO[loss] - margin, hist["val_loss"]
    assert comp.complete and comp.best_val_loss == min(hist["val_loss"])
    assert json.loads((out / "history.json").read_text())["val_loss"] == hist["val_loss"]
    assert (out / "loss.png").stat().st_size > 0

    # The saved model is the returned one, and the summary has the documented meaning/shape.
    maps, theta = data
    noisy = maps[:10] + SIGMA_N[None, :, None, None] * np.random.default_rng(1).normal(
        size=maps[:10].shape).astype(np.float32)
    loaded = load_compressor(out)
    s = comp.compress(noisy, batch_size=4)           # 4 does not divide 10: padded tail batch
    np.testing.assert_allclose(loaded.compress(noisy), s, rtol=1e-5, atol=1e-6)
    assert s.shape == (10, 2) and s.dtype == np.float32
    assert loaded.param_names == ("A", "h") and loaded.input_shape == (N_BINS, NPIX, NPIX)
    if loss != "vmim":
        # θ units: the estimate of the amplitude follows the truth (corr ≫ 0 after 6 epochs).
        assert np.corrcoef(s[:, 0], theta[:10, 0])[0, 1] > 0.5


def test_gnll_matches_gaussian_logpdf():
    # Independent check of the Cholesky-of-precision parametrisation: dense linear algebra.
    rng = np.random.default_rng(3)
    d = 3
    out = rng.normal(size=(5, d + d * (d + 1) // 2)).astype(np.float32)
    y = rng.normal(size=(5, d)).astype(np.float32)
    mu, chol = (np.asarray(a, np.float64)
                for a in _jit(gnll_split, static_argnums=1)(jnp.asarray(out), d))
    nll = np.asarray(_jit(gnll)(jnp.asarray(out), jnp.asarray(y)), np.float64)
    assert np.all(np.diagonal(chol, axis1=1, axis2=2) > 0) and np.allclose(chol, np.tril(chol))
    for i in range(5):
        cov = np.linalg.inv(chol[i] @ chol[i].T)
        r = y[i] - mu[i]
        ref = 0.5 * (r @ np.linalg.solve(cov, r) + np.linalg.slogdet(2 * np.pi * cov)[1])
        # float32 arithmetic on O(1–10) numbers: 1e-4 relative.
        np.testing.assert_allclose(nll[i], ref, rtol=1e-4)


def test_augmentation_is_d4_and_noise_has_sigma():
    # An asymmetric 4×4 map: the 8 elements of D4 give 8 different maps.
    base = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    d4 = {np.rot90(m, k).tobytes() for k in range(4) for m in (base[0, 0], base[0, 0].T)}
    assert len(d4) == 8
    out = np.asarray(_jit(random_dihedral)(_key(0), np.repeat(base, 256, 0)))
    seen = {m[0].tobytes() for m in out}
    assert seen == d4                   # every draw is a D4 element, and all 8 occur in 256
    noisy = np.asarray(_jit(add_shape_noise)(_key(1), jnp.zeros((64, 2, 16, 16)),
                                                jnp.array([0.1, 0.3])))
    # 16384 samples per bin: the sample std is within 3% (≈ 5.5σ) of sigma_n.
    np.testing.assert_allclose(noisy.std(axis=(0, 2, 3)), [0.1, 0.3], rtol=0.03)


# ---------------------------------------------------------------------------------------------
# 2. the flow's density is a normalised density, and sampling inverts it
# ---------------------------------------------------------------------------------------------

def _random_flow(dim, context, scale=0.15):
    """A 2-layer flow whose (zero-initialised) output layers get random weights, so every layer
    is a non-trivial context- and θ_<i-dependent transform (skewed, heavier-tailed, coupled)."""
    flow = ConditionalFlow(dim=dim, n_layers=2, hidden=16)

    @_jit
    def init():
        params = flow.init(_key(0), jnp.zeros((1, dim)), context[None])["params"]
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(_key(dim), len(leaves))
        leaves = [p + scale * jax.random.normal(k, p.shape) if p.shape[-1] == 4 else p
                  for p, k in zip(leaves, keys)]
        return jax.tree.unflatten(tree, leaves)

    return flow, init()


@pytest.mark.parametrize("dim", [1, 2])
def test_flow_density(dim):
    context = jnp.array([0.3, -0.5, 1.0])
    flow, params = _random_flow(dim, context)
    apply = functools.partial(flow.apply, {"params": params})
    ctx = lambda n: jnp.broadcast_to(context, (n, 3))  # noqa: E731

    # (a) ∫ q = 1 on a wide grid. Trapezoid rule with spacing 0.1 on [-20, 20]: this flow's
    # marginal sds are ≈ 0.65 and smooth, so the quadrature error is ≈ 1e-7 (checked against
    # 4× finer / 3× wider grids) and the mass outside is negligible; a wrong log-determinant
    # (a missing log δ, a non-triangular Jacobian) is off by O(10%).
    g = np.linspace(-20, 20, 401)
    pts = (g[:, None] if dim == 1 else
           np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)).astype(np.float32)
    q = np.exp(np.asarray(_jit(lambda t: apply(t, ctx(t.shape[0])))(pts), np.float64))
    q = q.reshape((g.size,) * dim)
    integ = (lambda f: np.trapezoid(f, g)) if dim == 1 else (
        lambda f: np.trapezoid(np.trapezoid(f, g), g))
    axes = [pts[:, i].reshape(q.shape).astype(np.float64) for i in range(dim)]
    total = integ(q)
    assert abs(total - 1.0) < 1e-3, total
    mean = [integ(q * x) for x in axes]
    var = [integ(q * (x - m) ** 2) for x, m in zip(axes, mean)]
    mu4 = [integ(q * (x - m) ** 4) for x, m in zip(axes, mean)]
    # Not the base N(0, I) in disguise (then the checks here would be vacuous).
    assert max(abs(m) for m in mean) > 0.2 or max(abs(v - 1) for v in var) > 0.2
    if dim == 2:
        corr = integ(q * (axes[0] - mean[0]) * (axes[1] - mean[1])) / math.sqrt(var[0] * var[1])
        assert abs(corr) > 0.05                          # the two dimensions really are coupled

    # (b) change of variables, checked independently: log N(z(θ)) + log|det ∂z/∂θ| with the
    # full Jacobian from autodiff (catches a non-triangular conditioner or a wrong log g').
    theta = np.random.default_rng(5).normal(size=(6, dim)).astype(np.float32) * 1.5

    @_jit
    def both(theta):
        def z_of(t):
            return apply(t[None], context[None], method=ConditionalFlow.forward)[0][0]

        z, jac = jax.vmap(z_of)(theta), jax.vmap(jax.jacfwd(z_of))(theta)
        ref = (-0.5 * jnp.sum(z**2, -1) - 0.5 * dim * math.log(2 * math.pi)
               + jnp.linalg.slogdet(jac)[1])
        return apply(theta, ctx(theta.shape[0])), ref

    # float32 sums of O(1–10) terms: 1e-4 absolute.
    np.testing.assert_allclose(*both(theta), atol=1e-4)

    # (c) sampling draws from the same density: sample mean and variance match the grid's within
    # 5 Monte-Carlo standard errors (se² = σ²/n and (μ4 - σ⁴)/n), and forward ∘ inverse = id.
    n = 20000
    sample = _jit(lambda k: apply(k, context, n, method=ConditionalFlow.sample))
    draws = np.asarray(sample(_key(7)), np.float64)
    for i in range(dim):
        assert abs(draws[:, i].mean() - mean[i]) < 5 * math.sqrt(var[i] / n), (i, mean)
        se_var = math.sqrt((mu4[i] - var[i] ** 2) / n)
        assert abs(draws[:, i].var() - var[i]) < 5 * se_var, (i, draws[:, i].var(), var)

    @_jit
    def round_trip(z):
        theta = apply(z, ctx(z.shape[0]), method=ConditionalFlow.inverse)
        return apply(theta, ctx(z.shape[0]), method=ConditionalFlow.forward)[0]

    z0 = np.random.default_rng(8).normal(size=(50, dim)).astype(np.float32)
    np.testing.assert_allclose(round_trip(z0), z0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# 3. an interrupted and resumed run ends exactly where the uninterrupted one does
# ---------------------------------------------------------------------------------------------

def test_resume_matches_uninterrupted(trained, data, tmp_path):
    full, _ = trained("mse")
    maps, theta = data
    cfg = _config("mse")
    part = train_compressor(maps, theta, SIGMA_N, cfg, tmp_path, param_names=("A", "h"),
                            progress=False, max_epochs_this_call=2)
    assert part.epochs_trained == 2 and not part.complete
    assert not load_compressor(tmp_path).complete         # a usable partial model is on disk
    done = train_compressor(maps, theta, SIGMA_N, cfg, tmp_path, param_names=("A", "h"),
                            progress=False)
    assert done.complete and done.epochs_trained == 6
    # Same compiled program, same inputs, RNG a function of (seed, epoch): the results are
    # bitwise equal in practice; rtol 1e-6 only allows for reordered float32 reductions.
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose(done.history[key], full.history[key], rtol=1e-6)
    assert done.best_epoch == full.best_epoch
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 done.params, full.params)
    # A finished run called again is a no-op that returns the same model.
    again = train_compressor(maps, theta, SIGMA_N, cfg, tmp_path, progress=False)
    assert again.history == done.history


def test_steps_per_epoch_cycles_the_split(data, tmp_path, monkeypatch):
    """A fixed epoch length larger than the split: each epoch's batches run through whole passes
    over the training maps, each map once per pass, and the schedule spans every step."""
    import compressors.train as T

    batches = []
    real = T._program

    def spy(*args, **kw):
        program = real(*args, **kw)

        def train_step(params, opt_state, ema, maps, y, *rest):
            batches.append(np.asarray(y))
            return program.train_step(params, opt_state, ema, maps, y, *rest)

        return program._replace(train_step=train_step)

    monkeypatch.setattr(T, "_program", spy)
    maps, theta = data
    # 40 maps, a quarter for validation: 30 training maps; 7 steps of 8 = 56 maps per epoch,
    # i.e. one whole pass and 26 maps of a second one.
    cfg = dataclasses.replace(_config("mse"), epochs=2, batch_size=8, steps_per_epoch=7)
    comp = train_compressor(maps[:40], theta[:40], SIGMA_N, cfg, tmp_path, progress=False)
    assert len(batches) == 14 and comp.epochs_trained == 2
    for epoch in (batches[:7], batches[7:]):
        rows = [tuple(r) for r in np.concatenate(epoch)]
        assert len(set(rows[:30])) == 30                  # the first pass: every map once ...
        assert len(set(rows[30:])) == 26                  # ... the second: no map twice ...
        assert set(rows[30:]) <= set(rows[:30])           # ... drawn from the same 30 maps
    # the cosine schedule decays over all 14 steps: to 1% of the peak at the last one
    assert comp.history["lr"][-1] == pytest.approx(0.01 * cfg.learning_rate, rel=1e-4)
    # without the key an epoch is one pass without the remainder: 30 // 8 = 3 steps
    batches.clear()
    train_compressor(maps[:40], theta[:40], SIGMA_N, dataclasses.replace(cfg, steps_per_epoch=None),
                     tmp_path / "pass", progress=False)
    assert len(batches) == 6
    with pytest.raises(ValueError, match="TrainConfig.steps_per_epoch must be an integer >= 1"):
        dataclasses.replace(cfg, steps_per_epoch=0)


# ---------------------------------------------------------------------------------------------
# 4. bad input
# ---------------------------------------------------------------------------------------------

def test_wrong_map_shape(trained):
    comp, _ = trained("mse")
    with pytest.raises(ValueError,
                       match=r"expected maps shaped \(n, 2, 8, 8\).*got \(3, 3, 8, 8\)"):
        comp.compress(np.zeros((3, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"got \(3, 2, 16, 16\)"):
        comp.compress(np.zeros((3, 2, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"got \(2, 8, 8\)"):
        comp.compress(np.zeros((2, 8, 8), np.float32))


def test_nan_rows(data, tmp_path):
    maps, theta = data
    bad = maps.copy()
    bad[[3, 17], 0, 1, 1] = np.nan
    with pytest.raises(ValueError, match=r"maps contain NaN or inf in 2 of 256 rows"):
        train_compressor(bad, theta, SIGMA_N, _config("mse"), tmp_path, progress=False)
    bad_theta = theta.copy()
    bad_theta[5, 1] = np.nan
    with pytest.raises(ValueError, match=r"theta contain NaN or inf in 1 of 256 rows"):
        train_compressor(maps, bad_theta, SIGMA_N, _config("mse"), tmp_path, progress=False)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_compressor(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_compressor(tmp_path / "empty")


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss="l2"), "loss must be one of"),
    (dict(network="vit"), "network must be one of"),
    (dict(epochs=0), "epochs must be an integer >= 1"),
    (dict(val_fraction=1.0), "val_fraction"),
    (dict(learning_rate=-1e-3), "learning_rate"),
    (dict(warmup_epochs=40, epochs=30), "warmup_epochs"),
    (dict(loss="mse", summary_dim=3), "summary_dim only applies"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_other_config_in_existing_dir(trained, data):
    _, out = trained("mse")
    maps, theta = data
    with pytest.raises(ValueError, match=r"different TrainConfig.*learning_rate"):
        train_compressor(maps, theta, SIGMA_N, dataclasses.replace(_config("mse"),
                                                                   learning_rate=1e-3),
                         out, progress=False)


# ---------------------------------------------------------------------------------------------
# 5. online training: fresh simulations in every batch
# ---------------------------------------------------------------------------------------------

def _toy_simulator(informative=True):
    """``_toy_data``'s model as a jittable (key, index) -> (θ, maps); uninformative: the maps
    come from an independent θ, so nothing about the returned θ can be learned from them."""
    x = jnp.linspace(-1, 1, NPIX)
    bump = jnp.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / 0.3)
    b = jnp.arange(N_BINS)[:, None, None]

    def simulate(key, index):
        k_theta, k_field, k_other = jax.random.split(jax.random.fold_in(key, index), 3)
        theta = jax.random.uniform(k_theta, (2,), minval=-1.0, maxval=1.0)
        used = theta if informative else jax.random.uniform(k_other, (2,), minval=-1, maxval=1)
        field = jax.random.normal(k_field, (N_BINS, NPIX, NPIX))
        maps = used[0] * (1 + 0.5 * b) * (1 + 0.3 * field) + used[1] * (-1.0) ** b * bump
        return theta, maps

    return simulate


# The fixed split: 192 training rows → 12 steps of 16 per epoch, 6 epochs → 1152 fresh draws.
ONLINE_DRAWS = 6 * (192 // 16) * 16


@pytest.fixture(scope="module")
def online(data, tmp_path_factory):
    maps, theta = data
    out = tmp_path_factory.mktemp("online")
    comp = train_compressor(maps, theta, SIGMA_N, _config("mse", online=True), out,
                            progress=False, simulate=_toy_simulator())
    return comp, out


def test_online_learns_from_the_draws_and_counts_them(online, data, tmp_path):
    comp, _ = online
    assert comp.online_simulations == ONLINE_DRAWS and comp.online_failed == 0
    assert comp.n_simulations == N_MAPS + ONLINE_DRAWS
    assert comp.history["simulations"] == [ONLINE_DRAWS // 6 * e for e in range(1, 7)]
    assert load_compressor(online[1]).online_simulations == ONLINE_DRAWS
    # Validated on the fixed maps. Predicting the prior mean scores their mean squared
    # standardised θ, 1 ± 0.18 for 64 maps; observed: online 0.38 (the fixed-data run 0.48),
    # and 0.89 when the draws' maps carry nothing about their θ. So the network learns from
    # the draws, not from the fixed maps; the bounds sit between the two.
    assert min(comp.history["val_loss"]) < 0.6
    maps, theta = data
    blind = train_compressor(maps, theta, SIGMA_N, _config("mse", online=True), tmp_path,
                             progress=False, simulate=_toy_simulator(informative=False))
    assert min(blind.history["val_loss"]) > 0.75


def test_online_resume_matches_uninterrupted(online, data, tmp_path):
    full, _ = online
    maps, theta = data
    cfg = _config("mse", online=True)
    part = train_compressor(maps, theta, SIGMA_N, cfg, tmp_path, progress=False,
                            simulate=_toy_simulator(), max_epochs_this_call=2)
    assert part.online_simulations == ONLINE_DRAWS // 3
    done = train_compressor(maps, theta, SIGMA_N, cfg, tmp_path, progress=False,
                            simulate=_toy_simulator())
    # The draws are a function of (seed, epoch, step): same tolerance argument as the
    # fixed-data resume test.
    np.testing.assert_allclose(done.history["val_loss"], full.history["val_loss"], rtol=1e-6)
    assert done.history["simulations"] == full.history["simulations"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 done.params, full.params)


def test_online_failed_draws_are_left_out(data, tmp_path):
    """A failed draw (NaN maps, as a PM run can give) is counted and weighs 0: a training step's
    loss and update are the other draws' alone. The run's draws zero a failed row, so a finite
    loss cannot tell; here the weight-0 rows carry values that would dominate the loss if used,
    and the step must not change, and its loss must be the mean of the kept rows' own losses."""
    inner = _toy_simulator()

    def flaky(key, index):   # every fourth draw fails
        theta, maps = inner(key, index)
        return theta, jnp.where(index % 4 == 0, jnp.nan, maps)

    maps, theta = data
    cfg = dataclasses.replace(_config("mse", online=True), epochs=2)
    comp = train_compressor(maps, theta, SIGMA_N, cfg, tmp_path, progress=False, simulate=flaky)
    assert comp.online_failed == comp.online_simulations // 4 == 2 * 12 * 16 // 4
    assert all(math.isfinite(v) for v in comp.history["train_loss"] + comp.history["val_loss"])

    # one step of the run's own program (192 training rows: 12 steps of 16) on a flaky batch
    batch, shape = cfg.batch_size, (N_BINS, NPIX, NPIX)
    x, y, weight = _online_draw(flaky, batch, comp.theta_mean, comp.theta_std, shape)(_key(1))
    failed = np.arange(batch) % 4 == 0
    np.testing.assert_array_equal(weight, ~failed)
    program = _program(cfg, 2, 12, _fast_compile(cfg, 192, shape))
    params, opt_state = program.init(_key(2), shape)

    def step(x, y, w):
        return program.train_step(params, opt_state, None, x, y, jnp.asarray(w, jnp.float32),
                                  _key(3), SIGMA_N, comp.map_mean, comp.map_std)

    new, _, _, loss = step(x, y, weight)
    # failed rows with maps 10x another draw's and θ 5σ from the prior mean
    x_bad = jnp.where(failed[:, None, None, None], 10 * jnp.roll(x, 1, axis=0), x)
    y_bad = jnp.where(failed[:, None], 5.0, y)
    assert float(step(x_bad, y_bad, np.ones(batch))[3]) > 2 * float(loss)  # they would count
    new_bad, _, _, loss_bad = step(x_bad, y_bad, weight)
    # bitwise: a weight-0 row adds exact zeros to the loss's sum and to every gradient
    assert float(loss_bad) == float(loss)
    jax.tree.map(np.testing.assert_array_equal, new_bad, new)
    # each kept row's own loss: the same step (same noise and symmetries) weighing it alone
    own = [float(step(x, y, np.eye(batch)[i])[3]) for i in np.flatnonzero(~failed)]
    # float32 sum of 12 positive terms: relative rounding <= 12 * 2**-24 = 7e-7
    assert float(loss) == pytest.approx(np.mean(own), rel=1e-6)


def test_online_bad_input(data, tmp_path):
    maps, theta = data
    cfg = _config("mse", online=True)
    with pytest.raises(ValueError, match="online training needs a simulate function.*missing"):
        train_compressor(maps, theta, SIGMA_N, cfg, tmp_path, progress=False)
    with pytest.raises(ValueError, match="only online training takes one.*online=False"):
        train_compressor(maps, theta, SIGMA_N, _config("mse"), tmp_path, progress=False,
                         simulate=_toy_simulator())

    def host_only(key, index):  # numpy on a tracer: cannot be jitted
        return jnp.zeros(2), np.asarray(jax.random.normal(key, (N_BINS, NPIX, NPIX)))

    with pytest.raises(ValueError, match=r"^online training needs a simulator that can be "
                                         r"jitted and vmapped; this one cannot \(Tracer"):
        train_compressor(maps, theta, SIGMA_N, cfg, tmp_path / "a", progress=False,
                         simulate=host_only)
    with pytest.raises(ValueError, match=r"gives θ \(3,\) and maps \(2, 8, 8\), the training "
                                         r"data θ \(2,\)"):
        train_compressor(maps, theta, SIGMA_N, cfg, tmp_path / "b", progress=False,
                         simulate=lambda k, i: (jnp.zeros(3), jnp.zeros((N_BINS, NPIX, NPIX))))
    with pytest.raises(ValueError, match="online needs augment=True"):
        TrainConfig(online=True, augment=False)


# ---------------------------------------------------------------------------------------------
# 6. a moving average of the weights
# ---------------------------------------------------------------------------------------------

def test_weight_average(trained, data, tmp_path):
    maps, theta = data
    plain, _ = trained("mse")
    # A decay of ~0 averages nothing: the same run as without (same programs and draws; the
    # bias correction divides by 1 - 1e-12 ** t = 1 to float32 precision).
    none = train_compressor(maps, theta, SIGMA_N, _config("mse", ema=1e-12), tmp_path / "a",
                            param_names=("A", "h"), progress=False)
    np.testing.assert_allclose(none.history["val_loss"], plain.history["val_loss"], rtol=1e-6)
    # A real average validates and saves other weights than the last ones ...
    cfg = _config("mse", ema=0.9)
    avg = train_compressor(maps, theta, SIGMA_N, cfg, tmp_path / "b", progress=False)
    assert avg.history["val_loss"] != plain.history["val_loss"]
    assert min(avg.history["val_loss"]) < 0.6          # and learns (plain run: 0.48)
    # ... and resumes exactly: the average is part of the checkpoint.
    part = train_compressor(maps, theta, SIGMA_N, cfg, tmp_path / "c", progress=False,
                            max_epochs_this_call=3)
    assert part.epochs_trained == 3
    done = train_compressor(maps, theta, SIGMA_N, cfg, tmp_path / "c", progress=False)
    np.testing.assert_allclose(done.history["val_loss"], avg.history["val_loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 done.params, avg.params)
    # The bias correction: with weights that barely move (learning rate 1e-7), the average is
    # the weights themselves; an uncorrected average from 0 would be (1 - 0.999^72) ≈ 7 % of
    # them after the 72 steps.
    still = lambda **kw: dataclasses.replace(_config("mse", **kw), learning_rate=1e-7)  # noqa: E731
    fixed = train_compressor(maps, theta, SIGMA_N, still(), tmp_path / "d", progress=False)
    slow = train_compressor(maps, theta, SIGMA_N, still(ema=0.999), tmp_path / "e",
                            progress=False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                 slow.params, fixed.params)
    with pytest.raises(ValueError, match=r"TrainConfig.ema must be a number in \(0.0, 1.0\)"):
        TrainConfig(ema=1.0)


# ---------------------------------------------------------------------------------------------
# 7. band powers beside (or instead of) the convolutions
# ---------------------------------------------------------------------------------------------

def _band_powers_direct(x, n_bands):
    """Independent reference: loops over bands and bin pairs with numpy's FFT and boolean masks."""
    from compressors.networks import band_membership

    ny, nx = x.shape[-2:]
    f = np.fft.fft2(x.astype(np.float64), norm="ortho")
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(ny) * ny, np.fft.fftfreq(nx) * nx, indexing="ij"))
    n = band_membership(ny, nx, n_bands).shape[1]
    edges = np.linspace(0.5, k.max() * (1 + 1e-9), n + 1)
    rows = []
    for i, j in zip(*np.triu_indices(x.shape[1])):
        per_band = []
        for b in range(n):
            m = (k >= edges[b]) & (k < edges[b + 1])
            pij = np.real(f[:, i][:, m] * np.conj(f[:, j][:, m])).mean(-1)
            pii, pjj = (np.mean(np.abs(f[:, c][:, m]) ** 2, -1) for c in (i, j))
            per_band.append(np.log(pii) if i == j else pij / np.sqrt(pii * pjj))
        rows.append(np.stack(per_band, -1))
    return np.stack(rows, 1).reshape(len(x), -1)


def test_band_power_features():
    from compressors.networks import band_membership, band_power_features

    # 32² has its corner at |k| = 22.6: 22 annuli one grid unit wide, or fewer when asked.
    assert band_membership(32, 32, 64).shape == (1024, 22)
    assert band_membership(32, 32, 8).shape == (1024, 8)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 32, 32)).astype(np.float32) * np.array([1, 2, 0.5])[:, None, None]
    got = np.asarray(band_power_features(jnp.asarray(x), 8))
    # float32 FFT of 1024 points against float64: ~1e-6 relative on powers of O(1).
    np.testing.assert_allclose(got, _band_powers_direct(x, 8), rtol=2e-5, atol=2e-5)
    assert got.shape == (4, 6 * 8)
    # Annular powers do not see where a structure is or which way the map is turned: periodic
    # shifts and the dihedral symmetries of the square leave them unchanged (round-off only).
    for moved in (np.roll(x, (5, -11), axis=(2, 3)), np.rot90(x, 1, axes=(2, 3)),
                  x[:, :, ::-1, :], np.swapaxes(x, 2, 3)):
        np.testing.assert_allclose(np.asarray(band_power_features(jnp.asarray(moved.copy()), 8)),
                                   got, rtol=1e-5, atol=1e-5)
    # A band emptied by a scale cut gives 0s with finite gradients (no log 0, no 0 / 0).
    f = np.fft.fft2(x)
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(32) * 32, np.fft.fftfreq(32) * 32, indexing="ij"))
    cut = np.real(np.fft.ifft2(np.where(k > 12, 0, f))).astype(np.float32)
    out, grad = jax.value_and_grad(lambda m: band_power_features(m, 8).sum())(jnp.asarray(cut))
    feats = np.asarray(band_power_features(jnp.asarray(cut), 8)).reshape(4, 6, 8)
    assert np.all(feats[:, :, -2:] == 0.0) and np.all(feats[:, :, :4] != 0.0)
    assert np.isfinite(float(out)) and np.all(np.isfinite(np.asarray(grad)))


def _power_law_fields(n, npix, seed):
    """θ = (log amplitude, slope) ~ U(-1, 1)²: Gaussian fields with P(k) ∝ e^{2 a} k^{-(1 + s)},
    so all the information is in the power spectrum."""
    rng = np.random.default_rng(seed)
    theta = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(npix) * npix, np.fft.fftfreq(npix) * npix,
                              indexing="ij"))
    k[0, 0] = 1.0
    amp = np.exp(theta[:, 0, None, None]) * k[None] ** (-(1 + theta[:, 1, None, None]) / 2)
    white = np.fft.fft2(rng.normal(size=(n, 1, npix, npix)))
    return np.real(np.fft.ifft2(white * amp[:, None])).astype(np.float32), theta


@pytest.mark.parametrize("network", ["power", "cnn"])
def test_band_powers_learn_the_power_spectrum(network, tmp_path):
    maps, theta = _power_law_fields(256, 16, seed=4)
    sigma = np.array([0.05], np.float32)
    cfg = dataclasses.replace(_config("mse", power_bands=6), network=network)
    comp = train_compressor(maps, theta, sigma, cfg, tmp_path, param_names=("a", "s"),
                            progress=False)
    # No information: validation mse 1 (standardised θ). Observed after 6 epochs: 0.17 (power),
    # 0.11 (cnn with band powers); the same cnn without them stays at 0.47, so this bound fails
    # when the band powers do not reach the head.
    assert comp.history["val_loss"][-1] < 0.3, comp.history["val_loss"]
    loaded = load_compressor(tmp_path)
    assert loaded.config.power_bands == 6 and loaded.config.network == network
    np.testing.assert_allclose(loaded.compress(maps[:8]), comp.compress(maps[:8]), rtol=1e-5,
                               atol=1e-6)


def test_band_power_config_errors():
    with pytest.raises(ValueError, match="TrainConfig.power_bands must be an integer >= 1"):
        TrainConfig(network="power", power_bands=0)
    with pytest.raises(ValueError, match="TrainConfig.power_bands must be an integer >= 0"):
        TrainConfig(power_bands=-1)
