import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldjax.models.functional import functional


def test_functional_matches_module_and_differentiates():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    apply_fn, params = functional(model)
    x = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_allclose(apply_fn(params, x), model(x))
    grads = jax.grad(lambda p: apply_fn(p, x).sum())(params)
    # d/dW sum(xW + b) = column sums of x broadcast over outputs; d/db = batch size
    np.testing.assert_allclose(grads["kernel"][...], np.repeat(x.sum(0)[:, None], 2, axis=1))
    np.testing.assert_allclose(grads["bias"][...], np.full(2, 2.0))


class _WithState(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 2, rngs=rngs)
        self.count = nnx.BatchStat(jnp.zeros(()))  # non-parameter state: closed over as a constant

    def __call__(self, x):
        return self.linear(x) + self.count[...]


def test_module_apply_is_shared_by_structure_and_compiles_once():
    from ldjax.models.functional import ModuleApply

    a, pa = functional(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    b, pb = functional(nnx.Linear(3, 2, rngs=nnx.Rngs(1)))  # other weights, same structure
    assert isinstance(a, ModuleApply) and a == b and hash(a) == hash(b)
    assert a != functional(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))[0]  # other shapes in the graph definition
    assert a != functional(nnx.Linear(3, 2, use_bias=False, rngs=nnx.Rngs(0)))[0]
    assert a != functional(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), method="__call__")[0]
    assert a != functional(nnx.Linear(3, 2, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))[0]  # a static attribute

    traces = []
    run = jax.jit(lambda params, x, fn: (traces.append(1), fn(params, x))[1], static_argnums=2)
    x = jnp.ones((2, 3))
    np.testing.assert_allclose(run(pa, x, a), nnx.merge(*nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0))))(x))
    np.testing.assert_allclose(run(pb, x, b), nnx.merge(*nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(1))))(x))
    assert len(traces) == 1  # the second model reused the first one's compiled function

    # Non-parameter state (arrays) or unhashable call arguments: equal only to itself, still exact.
    s1, p1 = functional(_WithState(nnx.Rngs(0)))
    s2, _ = functional(_WithState(nnx.Rngs(0)))
    assert s1 == s1 and s1 != s2
    np.testing.assert_allclose(s1(p1, x), _WithState(nnx.Rngs(0))(x))
    graphdef, _, rest = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.Param, ...)
    listed = ModuleApply(graphdef, rest, call_kwargs={"options": [1]})
    assert listed == listed and listed != ModuleApply(graphdef, rest, call_kwargs={"options": [1]})
