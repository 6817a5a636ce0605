"""Researchers' own models and losses: ``train.model: "pkg.module:Factory"`` and
``train.loss: "pkg.module:loss_fn"``.

A model factory is called with ``train.model_args`` as keywords and must build a Flax
module:

* **linen**: ``Factory(**model_args)`` returns an ``nn.Module``; its variables must be
  ``params`` only (the forward pass is a pure function of parameters and inputs: no
  batch statistics or dropout state, which the vmapped cells could not carry).
* **nnx**: a factory with an ``rngs`` parameter is nnx: ``Factory(**model_args,
  rngs=nnx.Rngs(PRNGKey(seed)))`` builds the module; its ``nnx.Param`` state is what
  the optimizers train (other state, e.g. ``BatchStat``, is refused for the same
  reason).

In both cases a factory parameter named ``num_outputs`` is filled with the data set's
number of classes / outputs / vocabulary size unless ``model_args`` sets it. Both kinds
are wrapped in :class:`LinenModel` / :class:`NnxModel`, which expose linen's
``init(key, x) -> params`` and ``apply(params, x) -> outputs`` over plain pytrees of
arrays, so the engine, every Optax optimizer and K-FAC treat them like the built-in
models. Each cell's initialisation is ``PRNGKey(seed)``, as for the built-in models.

A custom loss has :func:`cbs.train.models.loss_and_error`'s contract without the task:
``loss_fn(outputs, y) -> (mean loss, error rate)`` over a batch, the loss being the
mean of per-example losses (the validation metrics are computed per example, by
``vmap`` over single-example batches, and averaged); return NaN as the error rate
when it is not defined (then ``target.metric`` must be ``val_loss``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cbs.errors import ConfigError
from cbs.train.sources import _short, import_object

__all__ = [
    "LinenModel",
    "NnxModel",
    "CustomLoss",
    "build_user_model",
    "load_loss",
    "check_model",
    "kfac_unregistered",
]

MODEL = "train.model"


class LinenModel:
    """A linen module behind the ``init``/``apply`` interface (params only)."""

    def __init__(self, module):
        self.module = module

    def init(self, key, x):
        return self.module.init(key, x)

    def apply(self, params, x):
        return self.module.apply(params, x)

    def __repr__(self) -> str:
        return f"LinenModel({type(self.module).__name__})"


class NnxModel:
    """An nnx module factory behind ``init(key, x) -> params`` / ``apply(params, x)``.

    ``init`` builds the module with ``nnx.Rngs(key)`` and returns its ``nnx.Param`` state
    as a plain nested dict; ``apply`` merges such a dict into the graph definition
    (found once, abstractly) and calls the module.
    """

    def __init__(self, factory: Callable, kwargs: dict):
        from flax import nnx

        self.factory, self.kwargs = factory, kwargs
        abstract = nnx.eval_shape(lambda: factory(**kwargs, rngs=nnx.Rngs(0)))
        if not isinstance(abstract, nnx.Module):
            raise TypeError(f"returned {type(abstract).__name__}, not an nnx.Module")
        self.graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
        others = [
            (".".join(map(str, path)), type(v).__name__) for path, v in nnx.to_flat_state(rest)
        ]
        if others:
            raise _StatefulModel(others)
        self._template = params

    def init(self, key, x):
        from flax import nnx

        del x  # nnx modules know their input sizes from their constructor arguments
        module = self.factory(**self.kwargs, rngs=nnx.Rngs(key))
        _, params, _ = nnx.split(module, nnx.Param, ...)
        return nnx.to_pure_dict(params)

    def apply(self, params, x):
        from flax import nnx

        state = jax.tree.map(lambda v: v, self._template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)(x)

    def __repr__(self) -> str:
        return f"NnxModel({getattr(self.factory, '__name__', self.factory)})"


class _StatefulModel(Exception):
    def __init__(self, others):
        self.others = others


@dataclasses.dataclass(frozen=True)
class CustomLoss:
    """A user loss ``fn(outputs, y) -> (mean loss, error rate)``; used as the task."""

    spec: str
    fn: Callable

    def __str__(self) -> str:
        return f"custom loss {self.spec}"

    def batch(self, outputs, y):
        loss, err = self.fn(outputs, y)
        return jnp.asarray(loss, jnp.float32), jnp.asarray(err, jnp.float32)

    def per_example(self, outputs, y):
        return jax.vmap(lambda o, t: self.batch(o[None], t[None]))(outputs, y)


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params  # explicitly: a **kwargs factory is not guessed to take it


def build_user_model(spec: str, model_args: dict, num_outputs: int):
    """The wrapped model of ``train.model = spec``; ConfigError on any problem."""
    import flax.linen as nn

    factory = import_object(spec, MODEL)
    if not callable(factory):
        raise ConfigError(
            MODEL,
            spec,
            f"expected a Flax module class or a function building one; found "
            f"{type(factory).__name__}",
        )
    kwargs = dict(model_args or {})
    if "num_outputs" not in kwargs and _accepts(factory, "num_outputs"):
        kwargs["num_outputs"] = num_outputs
    nnx_style = _accepts(factory, "rngs") and "rngs" not in kwargs
    try:
        if nnx_style:
            return NnxModel(factory, kwargs)
        module = factory(**kwargs)
    except _StatefulModel as e:
        raise ConfigError(
            MODEL,
            spec,
            "expected a module whose only state is nnx.Param (a pure forward pass); "
            f"found {', '.join(f'{p} ({t})' for p, t in e.others[:4])}",
        ) from None
    except Exception as e:  # noqa: BLE001 - the user's factory failed
        raise ConfigError(
            MODEL,
            spec,
            f"expected {spec}(**train.model_args) to build a Flax module; it raised "
            f"{type(e).__name__}: {_short(e)}",
        ) from None
    if not isinstance(module, nn.Module):
        raise ConfigError(
            MODEL,
            spec,
            "expected a flax.linen Module (or an nnx factory taking rngs); found "
            f"{type(module).__name__}",
        )
    return LinenModel(module)


def load_loss(spec: str) -> CustomLoss:
    fn = import_object(spec, "train.loss")
    if not callable(fn):
        raise ConfigError(
            "train.loss",
            spec,
            f"expected a function loss_fn(outputs, y) -> (loss, error); found {type(fn).__name__}",
        )
    return CustomLoss(spec, fn)


def _spec(a) -> jax.ShapeDtypeStruct:
    a = np.asarray(a[:2]) if not isinstance(a, jax.ShapeDtypeStruct) else a
    return jax.ShapeDtypeStruct(a.shape, jax.dtypes.canonicalize_dtype(a.dtype))


def check_model(model, model_spec: str, task, x, y, num_outputs: int) -> None:
    """Abstract (shape-only) init and forward pass on two examples, and the output shape
    against the labels; ConfigError naming ``train.model`` (or ``train.loss``) otherwise."""
    xs, ys = _spec(x), _spec(y)
    key = jax.random.PRNGKey(0)
    try:
        variables = jax.eval_shape(model.init, key, xs)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            MODEL,
            model_spec,
            f"expected a model that initialises on inputs of shape {xs.shape} "
            f"({xs.dtype}); init raised {type(e).__name__}: {_short(e)}",
        ) from None
    if (
        isinstance(model, LinenModel)
        and isinstance(variables, dict)
        and set(variables) - {"params"}
    ):
        raise ConfigError(
            MODEL,
            model_spec,
            "expected variables 'params' only (a pure forward pass); found "
            f"collections {sorted(variables)}",
        )
    try:
        out = jax.eval_shape(model.apply, variables, xs)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            MODEL,
            model_spec,
            f"expected a forward pass on inputs of shape {xs.shape}; apply raised "
            f"{type(e).__name__}: {_short(e)}",
        ) from None
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise ConfigError(
            MODEL, model_spec, f"expected the model to return one array; found {type(out).__name__}"
        )
    if isinstance(task, CustomLoss):
        try:
            res = jax.eval_shape(task.fn, out, ys)
            ok = (
                isinstance(res, (tuple, list))
                and len(res) == 2
                and all(getattr(r, "shape", None) == () for r in res)
            )
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                "train.loss",
                task.spec,
                f"expected loss_fn(outputs {out.shape}, y {ys.shape}) -> "
                f"(loss, error); it raised {type(e).__name__}: {_short(e)}",
            ) from None
        if not ok:
            raise ConfigError(
                "train.loss",
                task.spec,
                "expected loss_fn(outputs, y) to return two scalars (mean "
                f"loss, error rate); found {jax.tree.map(lambda r: getattr(r, 'shape', r), res)}",
            )
        return
    want = {
        "classification": (2, num_outputs),
        "regression": tuple(ys.shape),
        "lm": tuple(ys.shape) + (num_outputs,),
    }[task]
    if tuple(out.shape) != want:
        what = {
            "classification": f"{num_outputs} logits per example",
            "regression": "one prediction per target value",
            "lm": f"{num_outputs} logits per position",
        }[task]
        raise ConfigError(
            MODEL,
            model_spec,
            f"expected outputs of shape {want} for labels of shape {ys.shape} "
            f"({task}: {what}); the model returns {tuple(out.shape)}",
        )


def kfac_unregistered(model, task: str, x, y) -> list[str]:
    """Parameter paths kfac-jax cannot place in a structured layer (it would fall back to
    a diagonal 'generic' block, which is not K-FAC): traced abstractly, no compute."""
    import kfac_jax

    from cbs.train.models import loss_and_error

    xs, ys = _spec(x), _spec(y)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), xs)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)

    def loss(p, batch):
        return loss_and_error(task, model.apply(p, batch[0]), batch[1], register_kfac=True)[0]

    batch = (jnp.zeros(xs.shape, xs.dtype), jnp.zeros(ys.shape, ys.dtype))
    tagged = kfac_jax.tag_graph_matcher.auto_register_tags(loss, (zeros, batch))
    closed = jax.make_jaxpr(tagged)(zeros, batch)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = {v: jax.tree_util.keystr(p) for v, (p, _) in zip(closed.jaxpr.invars, flat)}
    generic: list[str] = []

    def visit(jaxpr):
        for eq in jaxpr.eqns:
            meta = eq.params.get("meta")
            if eq.primitive.name == "layer_tag" and getattr(meta, "variant", "") == "generic":
                generic.extend(
                    names.get(v, "?")
                    for v in eq.invars
                    if not isinstance(v, jax.extend.core.Literal) and v in names
                )

    visit(closed.jaxpr)
    return generic


def as_array_dtype(a: Any) -> np.dtype:
    """The dtype JAX will hold ``a`` in (float64 becomes float32 without x64)."""
    return jax.dtypes.canonicalize_dtype(np.asarray(a[:1]).dtype)
