"""The compiled CIC kernels equal the pure-JAX path, in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simulators import native
from simulators import painting

pytestmark = pytest.mark.skipif(
    not native.available(jnp.float64),
    reason="compiled kernels unavailable (no C++ compiler, or LENSBENCH_NATIVE=0)")


@pytest.mark.parametrize("offset, wrap, mesh_factor", [(0, True, 1), (0, True, 2), (3, False, 1)])
def test_native_matches_xla(offset, wrap, mesh_factor):
    rng = np.random.default_rng(0)
    pshape = (6, 5, 7)
    shape = (6 * mesh_factor + 2 * offset, 5 * mesh_factor + 2 * offset, 7 * mesh_factor)
    scale = 2.0 if wrap else 1.0  # stay inside the halo when not periodic
    disp = jnp.asarray(rng.normal(scale=scale, size=pshape + (3,)))
    field = jnp.asarray(rng.normal(size=shape + (3,)))
    ct_mesh = jnp.asarray(rng.normal(size=shape))
    ct_read = jnp.asarray(rng.normal(size=pshape + (3,)))
    args = (mesh_factor, offset, wrap)

    def paint_n(d):
        return painting._paint_native(shape, d, jnp.full(pshape + (1,), 0.7), *args)[..., 0]

    def paint_x(d):
        return painting._paint_xla(shape, d, *args, 0.7)

    # float64: both sum the same 8 products, in different orders -> round-off only
    np.testing.assert_allclose(paint_n(disp), paint_x(disp), atol=1e-13)
    np.testing.assert_allclose(jax.grad(lambda d: jnp.vdot(ct_mesh, paint_n(d)))(disp),
                               jax.grad(lambda d: jnp.vdot(ct_mesh, paint_x(d)))(disp), atol=1e-12)

    def read_n(f, d):
        return jnp.vdot(ct_read, painting._read_native(f, d, *args))

    def read_x(f, d):
        return jnp.vdot(ct_read, painting._read_xla(f, d, *args))

    np.testing.assert_allclose(painting._read_native(field, disp, *args),
                               painting._read_xla(field, disp, *args), atol=1e-13)
    gn, gx = jax.grad(read_n, (0, 1))(field, disp), jax.grad(read_x, (0, 1))(field, disp)
    for a, b in zip(gn, gx):
        np.testing.assert_allclose(a, b, atol=1e-12)


def test_point_read_matches_the_lightcone_gather():
    """``painting.read_points_periodic`` (the lightcone's ray samples through the compiled kernels)
    equals the lightcone's pure-JAX trilinear gather, in values and in the gradient with respect to
    the field, at points inside, outside and on the edges of the periodic box; no gradient reaches
    the points (they are fixed sample positions)."""
    from simulators.lightcone import _trilinear

    rng = np.random.default_rng(1)
    shape = (6, 5, 9)
    field = jnp.asarray(rng.normal(size=shape + (2,)))
    cells = np.concatenate([rng.uniform(-7.0, 15.0, size=(200, 3)),
                            [[0.0, 0.0, 0.0], [6.0, 5.0, 9.0], [5.999, 4.5, 8.0], [-1e-9, 2.0, 3.0]]])
    cells = jnp.asarray(cells)
    ct = jnp.asarray(rng.normal(size=(cells.shape[0], 2)))
    zero = jnp.zeros(2, jnp.int32)

    def gather(f, c):
        return _trilinear(f, c, zero, shape[:2], 0, True)

    # float64: the same 8 products summed in different orders -> round-off only
    np.testing.assert_allclose(painting.read_points_periodic(field, cells), gather(field, cells),
                               atol=1e-13)
    g_native = jax.grad(lambda f: jnp.vdot(ct, painting.read_points_periodic(f, cells)))(field)
    g_xla = jax.grad(lambda f: jnp.vdot(ct, gather(f, cells)))(field)
    np.testing.assert_allclose(g_native, g_xla, atol=1e-12)
    g_cells = jax.grad(lambda c: jnp.vdot(ct, painting.read_points_periodic(field, c)))(cells)
    assert np.all(np.asarray(g_cells) == 0)

    # a traced count reads the first points only (the lightcone's samples inside a step's shell);
    # the rest are 0 and, with zero cotangents there, the field's gradient is the gather's
    read_first = jax.jit(painting.read_points_periodic)
    for count in (0, 57, cells.shape[0], cells.shape[0] + 5):
        got = np.asarray(read_first(field, cells, jnp.int32(count)))
        k = min(count, cells.shape[0])
        np.testing.assert_allclose(got[:k], gather(field, cells)[:k], atol=1e-13)
        assert np.all(got[k:] == 0)
        ct_k = ct.at[k:].set(0.0)
        g_first = jax.grad(lambda f: jnp.vdot(ct_k, read_first(f, cells, jnp.int32(count))))(field)
        g_ref = jax.grad(lambda f: jnp.vdot(ct_k, gather(f, cells)))(field)
        np.testing.assert_allclose(g_first, g_ref, atol=1e-12)


def test_any_channel_count_equals_channel_by_channel():
    """The kernels are compiled per channel count (1-3) with a generic loop for others: painting
    and reading 4 channels at once equals doing each channel alone (the 1-channel kernels), and so
    does the displacement gradient of the read, which sums over channels."""
    rng = np.random.default_rng(2)
    pshape, shape = (5, 4, 6), (5, 4, 6)
    disp = jnp.asarray(rng.normal(scale=2.0, size=pshape + (3,)))
    values = jnp.asarray(rng.normal(size=pshape + (4,)))
    field = jnp.asarray(rng.normal(size=shape + (4,)))
    ct = jnp.asarray(rng.normal(size=pshape + (4,)))
    args = (1, 0, True)
    one = [slice(c, c + 1) for c in range(4)]
    # float64; the same products summed in the same order per channel -> equal to round-off
    np.testing.assert_allclose(
        native.paint(shape, disp, values, *args),
        jnp.concatenate([native.paint(shape, disp, values[..., s], *args) for s in one], -1),
        atol=1e-14)
    np.testing.assert_allclose(
        native.read(field, disp, *args),
        jnp.concatenate([native.read(field[..., s], disp, *args) for s in one], -1), atol=1e-14)
    np.testing.assert_allclose(
        native.read_grad(field, disp, ct, *args),
        sum(native.read_grad(field[..., s], disp, ct[..., s], *args) for s in one), atol=1e-12)
