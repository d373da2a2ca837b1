"""The fused expert FFN (models/segment_ffn) against a per-row computation: outputs (inference,
which skips experts without rows, and training) and all gradients, with experts that get no
rows (zero kernel gradients), blocks that run past their segment, and rows after the last
segment."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switch_jax.models import segment_ffn

R, D, F, E = 13, 4, 6, 4


def _post(a, g, keep):
    h = jax.nn.relu(a) if g is None else jax.nn.gelu(a) * g
    return h if keep is None else jnp.where(keep, h / 0.9, 0)


def _per_row(x, sizes, wi, wg, wo, keep):
    """Row r of segment e through expert e's kernels, gathered per row; rows past the
    segments give 0."""
    expert_R = np.repeat(np.arange(E), sizes)
    n = len(expert_R)
    e = jnp.asarray(expert_R)
    xs = x[:n]
    a = jnp.einsum("rd,rdf->rf", xs, wi[e])
    g = None if wg is None else jnp.einsum("rd,rdf->rf", xs, wg[e])
    h = _post(a, g, None if keep is None else keep[:n])
    y = jnp.einsum("rf,rfd->rd", h, wo[e])
    return jnp.concatenate([y, jnp.zeros((R - n, D), y.dtype)])


@pytest.mark.parametrize(
    "sizes, gated, masked",
    [
        ([0, 5, 0, 6], True, True),  # empty first and middle experts, 2 rows after
        ([7, 0, 6, 0], False, False),  # empty last expert, every row in a segment
        ([0, 0, 0, 0], True, False),  # no rows at all
    ],
)
def test_fused_ffn_equals_per_row_ffn(sizes, gated, masked):
    rng = np.random.default_rng(sum(sizes))
    x = jnp.asarray(rng.standard_normal((R, D)), jnp.float32)
    wi, wg = (jnp.asarray(rng.standard_normal((E, D, F)), jnp.float32) for _ in range(2))
    wo = jnp.asarray(rng.standard_normal((E, F, D)), jnp.float32)
    wg = wg if gated else None
    keep = jnp.asarray(rng.random((R, F)) > 0.1) if masked else None
    cot = jnp.asarray(rng.standard_normal((R, D)), jnp.float32)
    sizes_E = jnp.asarray(sizes, jnp.int32)

    def fused(x, wi, wg, wo):
        # Block 4: full blocks of 4, tails of 2 and 1, so a 5-row segment needs a tail.
        y = segment_ffn.segment_ffn(x, sizes_E, wi, wg, wo, keep, _post, 4)
        return jnp.sum(y * cot), y

    def per_row(x, wi, wg, wo):
        y = _per_row(x, sizes, wi, wg, wo, keep)
        return jnp.sum(y * cot), y

    argnums = (0, 1, 2, 3) if gated else (0, 1, 3)
    (_, y), grads = jax.jit(jax.value_and_grad(fused, argnums, has_aux=True))(x, wi, wg, wo)
    (_, y_ref), grads_ref = jax.value_and_grad(per_row, argnums, has_aux=True)(x, wi, wg, wo)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    y_inference = jax.jit(lambda *a: fused(*a)[1])(x, wi, wg, wo)  # no residuals saved
    np.testing.assert_allclose(y_inference, y_ref, rtol=1e-5, atol=1e-5)
    assert not np.asarray(y[sum(sizes) :]).any()
    for got, want in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for e in np.flatnonzero(np.asarray(sizes) == 0):  # an expert without rows learns nothing
        for g in grads[1:]:
            assert not np.asarray(g[e]).any()
