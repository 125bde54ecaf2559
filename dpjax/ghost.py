"""Clipped sums without per-example gradients: ghost norms and book-keeping.

Implements ghost clipping (Goodfellow 2015, "Efficient Per-Example Gradient
Computations"; Li et al. 2022, "Large Language Models Can Be Strong
Differentially Private Learners"), its per-layer mix with per-example layer
gradients (Bu et al. 2022, "Scalable and Efficient Training of Large
Convolutional Neural Networks with Differential Privacy", mixed ghost
clipping) and book-keeping (Bu et al. 2023, "Differentially Private
Optimization on Large Model at Small Cost"), in JAX for the Flax layers of
CNNs and transformers: ``nn.Dense``, ``nn.DenseGeneral`` (the projections of
``nn.MultiHeadDotProductAttention``), ``nn.Conv``, ``nn.Embed`` (sparse norms
from the token ids), and ``nn.LayerNorm`` / ``nn.RMSNorm`` / ``nn.GroupNorm``
(one-row per-example gradients by the layer's own VJP).

One batched forward and backward captures, for every supported layer, its
input ``a`` and the gradient ``g`` of the example's loss with respect to its
output (a zero perturbation added to the output by a Flax method interceptor).
A layer's per-example kernel gradient is ``a_i^T g_i`` (conv: patches of
``a_i``), so its squared norm comes either from Gram matrices,
``<a_i a_i^T, g_i g_i^T>`` (the "ghost" norm: no per-example gradient is ever
built), or from the per-example layer gradient itself ("direct"). Clip factors
``c_i`` follow from the norms, and the clipped sum is book-kept from the same
tensors, without a second backward: ``sum_i c_i a_i^T g_i`` is one layer
weight-gradient with the output gradient scaled row by row, or the weighted
sum of the direct per-example gradients. Parameters of any other layer
(normalization, embeddings, custom modules) get per-example gradients by
``vmap`` in the same pass.

Privacy invariants owned here (DESIGN.md 1 and 6), shared with
:mod:`dpjax.per_example`: padding rows and rows whose norm is not finite
contribute exactly zero (``where`` on both ``a`` and ``g``, never a
multiplication by zero), and each example's contribution has norm at most the
clip bound. Ghost norms of sequences are float32 sums that can cancel, so they
are replaced by a rigorous upper bound of the exact norm (the computed value
plus a bound on its rounding error): clipping to an upper bound never lets an
example exceed the bound. Supported layers are found by tracing, and a layer
is used only if its kernel is a leaf of ``params`` used by nothing else
(checked on the jaxpr) and its patch geometry reproduces its output (checked
numerically), so a model this module misreads falls back to ``vmap`` instead
of giving wrong norms.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp

from dpjax import clipping as clipping_lib
from dpjax import per_example

PyTree = Any
NORM_ROUTES = ('speed', 'memory', 'ghost', 'direct')
# float32 unit roundoff, and the smallest normal number (XLA on CPU flushes
# subnormals to zero, an absolute error of at most this per operation).
_U = 2.0 ** -24
_TINY = 2.0 ** -126


# The parameter whose per-example gradient is never built on the ghost route
# (its norm from Gram matrices, its clipped sum book-kept), by layer kind.
_MATRIX = {'dense': 'kernel', 'conv': 'kernel', 'embed': 'embedding'}


@dataclasses.dataclass(frozen=True)
class Layer:
  """A supported layer call whose norms and clipped sum this module computes.

  Attributes:
    path: the Flax module path.
    module: an unbound copy of the module (applied to captured inputs).
    call: index of this call among the model's supported-layer calls.
    kind: 'dense' (``nn.Dense``, ``nn.DenseGeneral``), 'conv', 'embed' or
      'norm' (``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``).
    params: (name, index among ``jax.tree.leaves(params)``, shape) of each of
      the layer's parameters.
    in_shape: per-example input shape.
    out_shape: per-example output shape.
    tokens: T, rows of the per-example layer gradient product (sequence
      positions times output pixels); 1 for a plain Dense.
    fan_in: K, kernel rows per output feature (d_in, or kh*kw*c_in/groups;
      the vocabulary size of an embedding).
    features: C, output features.
    groups: conv feature groups (1 otherwise).
    geometry: for a conv, (kernel_size, strides, pads, dilation).
    norm_route: 'ghost' (Gram matrices) or 'direct' (per-example layer
      gradient) for the kernel or embedding; a norm layer's scale and bias
      always take the direct route (they are the size of one feature row).
  """

  path: tuple[str, ...]
  module: nn.Module
  call: int
  kind: str
  params: tuple[tuple[str, int, tuple[int, ...]], ...]
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  tokens: int
  fan_in: int
  features: int
  groups: int
  geometry: tuple | None
  norm_route: str

  @property
  def is_conv(self) -> bool:
    return self.geometry is not None

  @property
  def matrix(self) -> str | None:
    """Name of the parameter the ghost route book-keeps, if any."""
    return _MATRIX.get(self.kind)

  @property
  def indices(self) -> dict[str, int]:
    return {name: i for name, i, _ in self.params}

  def shape(self, name: str) -> tuple[int, ...]:
    return {n: s for n, _, s in self.params}[name]


@dataclasses.dataclass(frozen=True)
class GhostPlan:
  """Which parameters take which route for one model, loss and input shape.

  Attributes:
    layers: the layers handled by ghost norms / book-keeping.
    fallback: indices (in ``jax.tree.leaves(params)``) of the parameters
      whose per-example gradients come from ``vmap``.
    num_calls: number of supported-layer calls seen (owned or not).
    skipped: (path, reason) for each supported-layer call left to ``vmap``.
  """

  layers: tuple[Layer, ...]
  fallback: tuple[int, ...]
  num_calls: int
  skipped: tuple[tuple[tuple[str, ...], str], ...]

  def describe(self) -> str:
    """One line per layer: its route and why a skipped layer was skipped."""
    lines = [f"{'/'.join(l.path)}: {l.norm_route} norm (T={l.tokens},"
             f' K={l.fan_in}, C={l.features})' for l in self.layers]
    lines += [f"{'/'.join(p)}: vmap ({why})" for p, why in self.skipped]
    lines.append(f'{len(self.fallback)} parameter arrays by vmap')
    return '\n'.join(lines)


def choose_norm_route(tokens: int, fan_in: int, features: int,
                      policy: str = 'speed') -> str:
  """'ghost' or 'direct' norms for one layer (per feature group) under policy.

  Per example, the direct route builds the layer's gradient (T*K*C flops in
  small per-example products, K*C memory, written, squared and summed) and
  reuses it for the clipped sum; the ghost route builds Gram matrices
  (T^2 (K + C) flops, T^2 memory) and then needs the book-kept sum (T*K*C
  flops in ONE large product over the batch, about twice as fast per flop).
  'speed' takes the ghost route when T^2 (K + C) + T*K*C / 2 < T*K*C +
  13 K*C (the constants measured on CPU; always true for a plain Dense, T =
  1); 'memory' when 2 T^2 < K*C (mixed ghost clipping, Bu et al. 2022);
  'ghost' and 'direct' force one route. Gram norms are never used where
  float32 rounding would make their error bound vacuous.

  Examples:
    >>> from dpjax import ghost
    >>> [ghost.choose_norm_route(t, 288, 32) for t in (1, 1024)]
    ['ghost', 'direct']
    >>> ghost.choose_norm_route(64, 1152, 128, 'memory')
    'ghost'

  Args:
    tokens: T, rows of the per-example product (positions x output pixels).
    fan_in: K, kernel rows per output feature in a group.
    features: C, output features per group.
    policy: 'speed', 'memory', 'ghost' or 'direct'.

  Returns:
    'ghost' or 'direct'.
  """
  if policy not in NORM_ROUTES:
    raise ValueError(
        f'norm route must be one of {NORM_ROUTES}, got {policy!r}.')
  if max(tokens * tokens, fan_in, features) * _U > 0.01:
    return 'direct'
  if policy in ('ghost', 'direct'):
    return policy
  if policy == 'memory':
    return 'ghost' if 2 * tokens ** 2 < fan_in * features else 'direct'
  t, kc = tokens, fan_in * features
  ghost_cost = t * t * (fan_in + features) + t * kc / 2
  return 'ghost' if ghost_cost < t * kc + 13 * kc else 'direct'


# ----------------------------------------------------------------------------
# Conv geometry: patches whose product with the kernel is the conv output.


def _conv_geometry(module: nn.Conv, in_shape: Sequence[int]):
  """(kernel_size, strides, pads, dilation) of a flax Conv, or a reason."""
  ks = module.kernel_size
  ks = (ks,) if isinstance(ks, int) else tuple(ks)
  n = len(ks)

  def bcast(x):
    x = 1 if x is None else x
    return (x,) * n if isinstance(x, int) else tuple(x)

  if bcast(module.input_dilation) != (1,) * n:
    return 'input_dilation != 1'
  strides, dilation = bcast(module.strides), bcast(module.kernel_dilation)
  padding = nn.linear.canonicalize_padding(module.padding, n)
  if isinstance(padding, str):
    if padding not in ('SAME', 'VALID'):
      return f'padding {padding!r}'
    dilated = [(k - 1) * d + 1 for k, d in zip(ks, dilation)]
    padding = jax.lax.padtype_to_pads(
        tuple(in_shape[-n - 1:-1]), dilated, strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return ks, strides, pads, dilation


def _padded(x: jax.Array, geometry) -> tuple[jax.Array, list[int]]:
  """The conv's zero-padded input, and its output's spatial shape."""
  ks, strides, pads, dilation = geometry
  n = len(ks)
  lead = x.ndim - n - 1
  x = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] * lead + [
      (lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)])
  spatial = x.shape[lead:lead + n]
  return x, [(s - (k - 1) * d - 1) // st + 1
             for s, k, d, st in zip(spatial, ks, dilation, strides)]


def _tap_at(x: jax.Array, geometry, out: Sequence[int],
            offset: jax.Array) -> jax.Array:
  """One tap of the padded input ``x`` at a traced kernel offset [n]."""
  _, strides, _, dilation = geometry
  n = len(strides)
  lead = x.ndim - n - 1
  start = [0] * lead + [offset[i] * dilation[i] for i in range(n)] + [0]
  size = list(x.shape[:lead]) + [(m - 1) * st + 1 for m, st in zip(
      out, strides)] + [x.shape[-1]]
  window = jax.lax.dynamic_slice(x, start, size)
  return jax.lax.slice(window, [0] * x.ndim, window.shape,
                       [1] * lead + list(strides) + [1])


def conv_taps(x: jax.Array, geometry) -> list[jax.Array]:
  """The conv's input as one slice per kernel tap (no patch tensor).

  For x [..., *spatial, C] returns prod(kernel_size) arrays [...,
  *out_spatial, C], ordered like the kernel's spatial axes, such that the
  convolution with a kernel of shape (*kernel_size, C, F) is ``sum_o
  taps[o] @ kernel.reshape(-1, C, F)[o]``. Patches would stack them (K/C
  times the input, written with a strided layout that is slow on CPU);
  every product here is taken tap by tap instead.
  """
  ks, strides, pads, dilation = geometry
  n = len(ks)
  lead = x.ndim - n - 1
  x, out = _padded(x, geometry)
  taps = []
  for offset in itertools.product(*(range(k) for k in ks)):
    start = [0] * lead + [o * d for o, d in zip(offset, dilation)] + [0]
    limit = list(x.shape[:lead]) + [
        o * d + (m - 1) * st + 1
        for o, d, m, st in zip(offset, dilation, out, strides)] + [x.shape[-1]]
    taps.append(jax.lax.slice(x, start, limit,
                              [1] * lead + list(strides) + [1]))
  return taps


# Below this many input channels per group, the taps are stacked into
# patches: many products with a tiny contraction are slower than one.
_MIN_TAP_CHANNELS = 16


def _layer_taps(layer: Layer, a: jax.Array) -> list[jax.Array]:
  """The layer input as a list of [m, T, G, c] blocks.

  Each block's product with the matching rows of the kernel, summed over
  blocks, is the layer's output: for a Dense one block (c = K); for a conv
  one block per kernel tap (c = C/G), or one block of patches (c = K) when
  C/G is small.
  """
  m = a.shape[0]
  if not layer.is_conv:
    return [a.reshape(m, layer.tokens, 1, -1)]
  taps = [x.reshape(m, layer.tokens, layer.groups, -1)
          for x in conv_taps(a, layer.geometry)]
  if taps[0].shape[-1] < _MIN_TAP_CHANNELS:
    taps = [jnp.stack(taps, axis=-2).reshape(m, layer.tokens, layer.groups,
                                             -1)]
  return taps


def _out_grads(layer: Layer, g: jax.Array) -> jax.Array:
  """[m, T, G, F/G]."""
  return g.reshape(g.shape[0], layer.tokens, layer.groups, -1)


def _kernel_blocks(layer: Layer, kernel: jax.Array, blocks: int) -> jax.Array:
  """The kernel as [blocks, c, G, F/G], matching :func:`_layer_taps`."""
  return kernel.reshape(blocks, -1, layer.groups,
                        layer.features // layer.groups)


def _probe(shape: tuple[int, ...], phase: float) -> jax.Array:
  """Deterministic, irregular probe values (no key: nothing random here)."""
  size = math.prod(shape)
  return jnp.sin(jnp.arange(size, dtype=jnp.float32) * 0.7 + phase).reshape(
      shape)


def _geometry_reproduces_output(layer: Layer) -> bool:
  """Whether the taps times the kernel equal the module's own output."""
  with jax.ensure_compile_time_eval():
    x = _probe((1,) + layer.in_shape, 0.0)
    taps = _layer_taps(layer, x)
    w = {name: _probe(shape, phase)
         for phase, (name, _, shape) in enumerate(layer.params)}
    expected = layer.module.apply({'params': w}, x).reshape(
        1, layer.tokens, layer.features)
    k = _kernel_blocks(layer, w['kernel'], len(taps))
    got = sum(jnp.einsum('mtgc,cgo->mtgo', x_o, k[o])
              for o, x_o in enumerate(taps)).reshape(expected.shape)
    if 'bias' in w:
      got = got + w['bias'].reshape(-1)
    scale = float(jnp.max(jnp.abs(expected))) + 1.0
    return bool(jnp.max(jnp.abs(got - expected)) <= 1e-4 * scale)


# ----------------------------------------------------------------------------
# Finding the layers: one trace records every supported call, a second checks
# that each candidate's parameters reach the loss through that call only.


def _is_float32(x) -> bool:
  return jnp.result_type(x) == jnp.float32


_DENSE = (nn.Dense, nn.DenseGeneral)
_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)
_SUPPORTED = _DENSE + (nn.Conv, nn.Embed) + _NORMS


def _layer_params(module, leaf_index) -> list | str:
  """(name, leaf index, shape) of each parameter, or a reason to skip."""
  params = module.variables.get('params', {})
  found = [(name, leaf_index.get(id(params[name])), tuple(params[name].shape))
           for name in sorted(params)]
  if not found:
    return 'no parameters'
  if all(i is None for _, i, _ in found):
    # Constants of the loss (frozen weights), or lifted copies.
    return 'its weights are not leaves of params (frozen, transformed or lifted)'
  if any(i is None for _, i, _ in found):
    return 'some weights are not leaves of params (transformed or lifted)'
  if set(module.variables) - {'params'}:
    return 'has variables other than params'
  if not all(_is_float32(params[name]) for name in params):
    return 'not float32'
  return found


def _dense_general_shape(module: nn.DenseGeneral, x, kernel_shape):
  """(tokens, fan_in) of a DenseGeneral over trailing axes, or a reason."""
  if module.batch_dims:
    return 'DenseGeneral with batch_dims'
  axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
  n = len(axis)
  # The kernel's rows follow ``axis`` in the order given; reshaping the input
  # matches them only for the trailing axes in increasing order.
  if tuple(a % x.ndim for a in axis) != tuple(range(x.ndim - n, x.ndim)):
    return f'DenseGeneral over axes {axis}, not the trailing ones in order'
  if tuple(kernel_shape[:n]) != tuple(x.shape[-n:]):
    return 'kernel does not match the contracted axes'
  return math.prod(x.shape[:-n]), math.prod(x.shape[-n:])


def _inspect_call(module, args, kwargs, out, leaf_index, call):
  """A :class:`Layer` for one intercepted call, or a reason to skip it."""
  if kwargs or len(args) != 1:
    return 'called with extra arguments'
  x = args[0]
  params = _layer_params(module, leaf_index)
  if isinstance(params, str):
    return params
  names = {name for name, _, _ in params}
  embed = isinstance(module, nn.Embed)
  if not ((jnp.issubdtype(jnp.result_type(x), jnp.integer) if embed
           else _is_float32(x)) and _is_float32(out)
          and module.dtype in (None, jnp.float32)):
    return 'not float32'
  in_shape, out_shape = tuple(x.shape), tuple(out.shape)
  features, groups, geometry = out_shape[-1] if out_shape else 0, 1, None
  if isinstance(module, _NORMS):
    if module.axis_name is not None:
      return 'statistics across devices (axis_name)'
    kind, tokens, fan_in = 'norm', 1, 1
  elif embed:
    kind, tokens, fan_in = 'embed', math.prod(in_shape), module.num_embeddings
  else:
    kind = 'conv' if isinstance(module, nn.Conv) else 'dense'
    if 'kernel' not in names or not names <= {'kernel', 'bias'}:
      return 'parameters other than kernel and bias'
    kernel_shape = dict((n, s) for n, _, s in params)['kernel']
    if kind == 'conv':
      if module.mask is not None:
        return 'masked conv'
      if module.conv_general_dilated is not None or (
          module.conv_general_dilated_cls is not None):
        return 'custom conv_general_dilated'
      geometry = _conv_geometry(module, in_shape)
      if isinstance(geometry, str):
        return geometry
      groups = module.feature_group_count
      fan_in = math.prod(kernel_shape[:-1])
      tokens = math.prod(out_shape[:-1])
    else:
      if module.dot_general is not None or module.dot_general_cls is not None:
        return 'custom dot_general'
      if isinstance(module, nn.Dense):
        if len(kernel_shape) != 2:
          return 'kernel is not 2-D'
        tokens, fan_in = math.prod(in_shape[:-1]), in_shape[-1]
      else:
        shape = _dense_general_shape(module, x, kernel_shape)
        if isinstance(shape, str):
          return shape
        tokens, fan_in = shape
        features = math.prod(kernel_shape) // fan_in
  if features == 0 or fan_in == 0:
    return 'empty layer'
  return Layer(path=tuple(module.scope.path), module=module.clone(parent=None),
               call=call, kind=kind, params=tuple(params), in_shape=in_shape,
               out_shape=out_shape, tokens=tokens, fan_in=fan_in,
               features=features, groups=groups, geometry=geometry,
               norm_route='')


def _supported_call(context) -> bool:
  return context.method_name == '__call__' and type(
      context.module) in _SUPPORTED


class _Capture:
  """Method interceptor that runs owned layers from given weights.

  Owned layer ``j`` computes ``module.apply({'params': weights[j]}, x) +
  perturbations[j]`` and records ``x``, or ``wrap(j, x, y)`` of that output
  ``y`` when ``wrap`` is given; other calls run unchanged.
  """

  def __init__(self, layers, weights, perturbations, wrap=None):
    self.by_call = {l.call: j for j, l in enumerate(layers)}
    self.layers, self.weights, self.perturbations = (layers, weights,
                                                     perturbations)
    self.wrap = wrap
    self.inputs = [None] * len(layers)
    self.calls = 0
    self.inside = False

  def __call__(self, next_fun, args, kwargs, context):
    if self.inside or not _supported_call(context):
      return next_fun(*args, **kwargs)
    call, self.calls = self.calls, self.calls + 1
    j = self.by_call.get(call)
    if j is None:
      return next_fun(*args, **kwargs)
    layer = self.layers[j]
    if tuple(context.module.scope.path) != layer.path:
      raise RuntimeError(
          f'ghost clipping: call {call} reached {context.module.scope.path},'
          f' traced as {layer.path}; the model must call its layers in the'
          ' same order for every example.')
    self.inside = True
    try:
      y = layer.module.apply({'params': self.weights[j]}, args[0])
    finally:
      self.inside = False
    if self.wrap is not None:
      return self.wrap(j, args[0], y)
    self.inputs[j] = args[0]
    return y + self.perturbations[j]


def _layer_weights(layer: Layer, leaves) -> dict[str, jax.Array]:
  return {name: leaves[i] for name, i, _ in layer.params}


def _used_invars(jaxpr) -> set:
  used = set()
  for eqn in jaxpr.eqns:
    used.update(v for v in eqn.invars if not isinstance(v, jax_core.Literal))
  used.update(v for v in jaxpr.outvars if not isinstance(v, jax_core.Literal))
  return used


def _discover_calls(loss_fn, treedef, leaves, example, args
                    ) -> tuple[list, set]:
  """(path, Layer or reason to skip) for every supported call, in order.

  Also returns the paths of embeddings used as an output layer
  (``nn.Embed.attend``: tied weights).
  """
  found: list = []
  tied: set = set()

  def discover(leaves, example):
    index = {id(x): i for i, x in enumerate(leaves)}
    top = jax.tree.leaves((example, leaves))[0]._trace

    def interceptor(next_fun, call_args, kwargs, context):
      out = next_fun(*call_args, **kwargs)
      if context.method_name == 'attend' and isinstance(context.module,
                                                        nn.Embed):
        tied.add(tuple(context.module.scope.path))
      if _supported_call(context):
        # Under an inner transformation (a vmap over augmented views, a
        # remat, a scan) the captured input would be that trace's value.
        inner = not call_args or getattr(call_args[0], '_trace',
                                         None) is not top
        found.append((tuple(context.module.scope.path), (
            'called inside a transformation (vmap, remat, scan)' if inner
            else _inspect_call(context.module, call_args, kwargs, out, index,
                               len(found)))))
      return out

    with nn.intercept_methods(interceptor):
      return loss_fn(jax.tree.unflatten(treedef, leaves), example, *args)

  jax.make_jaxpr(discover)(leaves, example)
  return found, tied


def _drop(candidates: list, skipped: dict, bad, reason: str) -> None:
  for l in bad:
    candidates.remove(l)
    skipped[l.call] = (l.path, reason)


def _exclusive_layers(loss_fn, treedef, leaves, example, args,
                      candidates: list, skipped: dict) -> None:
  """Drops candidates whose parameters the loss also uses elsewhere.

  Owned leaves must be unused once owned layers read their own copies
  (checked on the jaxpr); dropping one layer can expose another's use, so
  this repeats until nothing changes.
  """
  while candidates:
    def check(leaves, weights, example):
      capture = _Capture(candidates, weights, [0.0] * len(candidates))
      with nn.intercept_methods(capture):
        return loss_fn(jax.tree.unflatten(treedef, leaves), example, *args)
    weights = [_layer_weights(l, leaves) for l in candidates]
    closed = jax.make_jaxpr(check)(leaves, weights, example)
    used = _used_invars(closed.jaxpr)
    invars = closed.jaxpr.invars[:len(leaves)]
    bad = [l for l in candidates
           if any(invars[i] in used for _, i, _ in l.params)]
    if not bad:
      return
    _drop(candidates, skipped, bad, 'its parameters are also used elsewhere')


def make_plan(loss_fn: Callable[..., Any], params: PyTree, example: PyTree,
              args: Sequence[Any] = (), *, has_aux: bool = False,
              norm_route: str = 'speed') -> GhostPlan:
  """Finds the layers whose norms the fast routes compute without vmap.

  Traces ``loss_fn(params, example, *args)`` (no computation) and keeps the
  calls of supported layers (module docstring) that are float32, take every
  weight straight from ``params`` and are the only users of those leaves (a
  weight shared with another layer, a tied embedding or a weight used by a
  regularizer in the loss goes to the vmap fallback, since its per-example
  gradient has other terms). Layers whose weights are not leaves of
  ``params`` at all (frozen: constants of the loss) run unchanged.

  Args:
    loss_fn: ``loss_fn(params, example, *args)`` for ONE example, as for
      :func:`dpjax.clipped_grad`.
    params: the parameters (arrays or ShapeDtypeStructs).
    example: ONE example (no batch axis; arrays or ShapeDtypeStructs).
    args: extra arguments of ``loss_fn``, shared by the whole batch.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    norm_route: 'speed', 'memory', 'ghost' or 'direct' (see
      :func:`choose_norm_route`).

  Returns:
    A :class:`GhostPlan`.
  """
  choose_norm_route(1, 1, 1, norm_route)  # validates the name
  del has_aux  # the plan does not depend on the loss's outputs
  leaves, treedef = jax.tree.flatten(params)
  leaves = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
            for x in leaves]
  found, tied = _discover_calls(loss_fn, treedef, leaves, example, args)
  candidates = [l for _, l in found if isinstance(l, Layer)]
  skipped = {l.call if isinstance(l, Layer) else i: (p, l)
             for i, (p, l) in enumerate(found) if not isinstance(l, Layer)}
  # A module called twice shares its weights between calls.
  paths = [l.path for l in candidates]
  _drop(candidates, skipped, [l for l in candidates
                              if paths.count(l.path) > 1],
        'called more than once')
  _drop(candidates, skipped, [l for l in candidates if l.path in tied],
        'tied weights: the embedding is also the output layer (attend), so'
        ' its per-example gradient sums two uses; vmap computes it')
  _drop(candidates, skipped, [
      l for l in candidates
      if (l.is_conv or isinstance(l.module, nn.DenseGeneral))
      and not _geometry_reproduces_output(l)],
        'patch geometry does not match the output')
  _exclusive_layers(loss_fn, treedef, leaves, example, args, candidates,
                    skipped)
  layers = tuple(dataclasses.replace(l, norm_route=_layer_norm_route(
      l, norm_route)) for l in candidates)
  owned = {i for l in layers for _, i, _ in l.params}
  fallback = tuple(i for i in range(len(leaves)) if i not in owned)
  return GhostPlan(layers, fallback, len(found),
                   tuple(skipped[k] for k in sorted(skipped)))


def _layer_norm_route(layer: Layer, policy: str) -> str:
  """The route of one layer's kernel or embedding under ``policy``.

  A norm layer's parameters are one feature row each: always direct. An
  embedding's per-example gradient is [vocabulary, features], so it takes
  the sparse Gram route (:func:`embed_sq_norms`) unless forced direct (a
  parameter mask); its error bound grows with T, not T^2.
  """
  if layer.kind == 'norm':
    return 'direct'
  if layer.kind == 'embed':
    return 'direct' if policy == 'direct' else 'ghost'
  return choose_norm_route(layer.tokens, layer.fan_in,
                           layer.features // layer.groups, policy)


# ----------------------------------------------------------------------------
# Norms and book-kept sums of one layer from its captured (a, g).


def direct_grads(layer: Layer, a: jax.Array, g: jax.Array) -> jax.Array:
  """Per-example kernel gradients [m, *kernel_shape], tap by tap.

  Args:
    layer: the layer.
    a: [m, *in_shape] the layer's inputs.
    g: [m, *out_shape] gradients of each example's loss w.r.t. its output.
  """
  m = a.shape[0]
  go = _out_grads(layer, g)
  grads = jnp.stack([jnp.einsum('mtgc,mtgo->mcgo', x, go)
                     for x in _layer_taps(layer, a)], axis=1)
  return grads.reshape((m,) + layer.shape('kernel'))


def direct_sq_norms(layer: Layer, a: jax.Array, g: jax.Array) -> jax.Array:
  """[m] squared norms of the per-example kernel gradients, tap by tap.

  The squared norm is the sum over kernel taps of the squared norms of the
  taps' blocks, so no tap's block outlives its own term: the memory of
  :func:`direct_grads` without its [m, *kernel_shape] result.
  """
  go = _out_grads(layer, g)
  block_sq = lambda x: jnp.sum(jnp.square(jnp.einsum('mtgc,mtgo->mcgo', x,
                                                     go)), axis=(1, 2, 3))
  if not layer.is_conv or layer.in_shape[-1] // layer.groups < (
      _MIN_TAP_CHANNELS):
    return sum(block_sq(x) for x in _layer_taps(layer, a))
  # A loop, so that XLA holds one tap (an activation-sized slice) at a time.
  m = a.shape[0]
  x, out = _padded(a, layer.geometry)
  offsets = jnp.array(list(itertools.product(
      *(range(k) for k in layer.geometry[0]))), jnp.int32)

  def tap(total, offset):
    x_o = _tap_at(x, layer.geometry, out, offset)
    return total + block_sq(x_o.reshape(m, layer.tokens, layer.groups, -1)), None

  return jax.lax.scan(tap, jnp.zeros(m, jnp.float32), offsets)[0]


def ghost_sq_norms(layer: Layer, a: jax.Array,
                   g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Ghost squared norms of per-example kernel gradients, and their error.

  ||a_i^T g_i||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s) from the Gram matrices
  P = a a^T (conv: summed over taps), Q = g g^T, never forming a_i^T g_i.
  With T > 1 the float32 sum can cancel (an example's gradient small while
  its terms are huge), so a rounding-error bound is returned with it. A dot
  or sum of n terms is off by at most gamma_n = n u / (1 - n u) times the sum
  of the absolute values of its terms, in any summation order; so P_ts is
  off by at most gamma_k |a_t||a_s| (k: the dot length plus the number of
  taps summed), Q_ts by gamma_c |g_t||g_s|, and the total by gamma_k sum
  |a_t||a_s||Q_ts| + gamma_c sum |P_ts||g_t||g_s| + gamma_k gamma_c W^2 +
  gamma_2T sum |P_ts Q_ts| (W = sum_t |a_t||g_t|; the sum over s, then over
  t, kept apart by an optimization barrier), plus a term for flushed
  subnormals; twice that covers second-order terms and the rounding of the
  bound itself. Everything is computed after an exact power-of-two rescaling
  of each example's a and g. For T = 1 the single outer product cannot
  cancel and the bound is 0 (the estimate's relative error is that of any
  norm computation).

  Args:
    layer: the layer.
    a: [m, *in_shape] the layer's inputs.
    g: [m, *out_shape] gradients of each example's loss w.r.t. its output.

  Returns:
    ([m] estimates, [m] bounds on |estimate - exact|), summed over groups.
  """
  # Exact power-of-two rescaling per example, so that huge activations with
  # tiny gradients do not overflow the Gram entries.
  a, ea = _pow2_normalize(a)
  g, eg = _pow2_normalize(g)
  e1 = jnp.floor((ea + eg) / 2)
  e2 = ea + eg - e1
  # x * 4^(ea + eg) by exact steps that never overflow before the result.
  rescale = lambda x: x * jnp.exp2(e1) * jnp.exp2(e2) * jnp.exp2(e1) * jnp.exp2(
      e2)
  taps = _layer_taps(layer, a)
  go = _out_grads(layer, g)
  alpha = jnp.sqrt(sum(jnp.sum(jnp.square(x), axis=-1) for x in taps))
  beta = jnp.sqrt(jnp.sum(jnp.square(go), axis=-1))            # [m, T, G]
  if layer.tokens == 1:
    sq = jnp.sum(jnp.square(alpha[:, 0] * beta[:, 0]), axis=-1)
    return rescale(sq), jnp.zeros_like(sq)
  p = sum(jnp.einsum('mtgc,msgc->mgts', x, x) for x in taps)
  q = jnp.einsum('mtgc,msgc->mgts', go, go)
  pq = p * q
  per_group = jnp.sum(jax.lax.optimization_barrier(jnp.sum(pq, axis=-1)), -1)
  sq = jnp.sum(per_group, axis=1)
  gamma = lambda n: n * _U / (1 - n * _U)
  k = taps[0].shape[-1] + (len(taps) if len(taps) > 1 else 0)
  c, n = go.shape[-1], 2 * layer.tokens
  alpha, beta = jnp.moveaxis(alpha, 2, 1), jnp.moveaxis(beta, 2, 1)
  outer = lambda x: x[..., :, None] * x[..., None, :]
  w = jnp.sum(alpha * beta, axis=-1)
  total = lambda x: jnp.sum(x, axis=(1, 2, 3))
  err = (gamma(k) * total(outer(alpha) * jnp.abs(q))
         + gamma(c) * total(jnp.abs(p) * outer(beta))
         + gamma(k) * gamma(c) * jnp.sum(jnp.square(w), axis=1)
         + gamma(n) * total(jnp.abs(pq))
         + gamma(layer.groups) * jnp.sum(jnp.abs(per_group), axis=1))
  # Flushed subnormals (XLA on CPU): at most _TINY per product of two
  # nonzero entries (every entry is at most 2 after the rescaling).
  nz_a = jnp.moveaxis(sum(jnp.sum(jnp.abs(x), axis=-1) for x in taps) > 0, 2, 1)
  nz_g = jnp.moveaxis(jnp.sum(jnp.abs(go), axis=-1) > 0, 2, 1)
  flush = _TINY * jnp.sum(
      4 * k * jnp.square(jnp.sum(nz_a * beta, axis=-1))
      + 4 * c * jnp.square(jnp.sum(nz_g * alpha, axis=-1))
      + jnp.square(jnp.sum(nz_a & nz_g, axis=-1)), axis=1)
  return rescale(sq), rescale(2.0 * (err + flush))


def _pow2_normalize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x / 2^e, e) per row, 2^e about max |x_row| (|e| <= 126: exact)."""
  peak = jnp.max(jnp.abs(x).reshape(x.shape[0], -1), axis=1)
  ok = jnp.isfinite(peak) & (peak > 0)
  e = jnp.where(ok, jnp.floor(jnp.log2(jnp.where(ok, peak, 1.0))), 0.0)
  e = jnp.clip(e, -126, 126)
  return x * jnp.exp2(-e).reshape((-1,) + (1,) * (x.ndim - 1)), e


def _rows(keep: jax.Array, x: jax.Array) -> jax.Array:
  """x with the rows where ``keep`` is False replaced by exact zeros."""
  return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)


def embed_sq_norms(layer: Layer, ids: jax.Array,
                   g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Squared norms of per-example embedding gradients, and their error.

  An example's embedding gradient has one row per distinct token id v, the
  sum G_v of the output gradients at the positions holding v, so its squared
  norm is sum_v |G_v|^2 (sparse: no [vocabulary, features] array). With
  H_t = sum_s [id_s = id_t] g_s (= G_{id_t}, T^2 d flops) and n_t the count
  of id_t, it is sum_t |H_t|^2 / n_t: a sum of non-negative terms. Each
  entry of H is off by at most gamma_T sum_s [id_s = id_t] |g_s| (plus T
  flushed subnormals), so the squares of |H| plus that bound give an upper
  bound of the exact norm. Positions ``jnp.take`` does not read (ids outside
  [-V, V)) contribute nothing, as in the layer's own gradient.

  Args:
    layer: an 'embed' layer.
    ids: [m, *in_shape] the integer inputs.
    g: [m, *in_shape, features] gradients of each example's loss w.r.t. its
      output.

  Returns:
    ([m] estimates, [m] bounds on |estimate - exact|).
  """
  m, t, vocab = ids.shape[0], layer.tokens, layer.fan_in
  ids = ids.reshape(m, t)
  if vocab == 1:  # Embed broadcasts its one row whatever the ids.
    ids = jnp.zeros_like(ids)
  ids = jnp.where(ids < 0, ids + vocab, ids)
  valid = (ids >= 0) & (ids < vocab)
  g, e = _pow2_normalize(jnp.where(valid[..., None], g.reshape(m, t, -1), 0))
  same = ((ids[:, :, None] == ids[:, None, :]) & valid[:, :, None]
          & valid[:, None, :]).astype(jnp.float32)
  h = jnp.einsum('mts,msd->mtd', same, g)
  h_err = (t * _U / (1 - t * _U)) * jnp.einsum('mts,msd->mtd', same,
                                                jnp.abs(g)) + t * _TINY
  count = jnp.maximum(jnp.sum(same, axis=-1), 1.0)[..., None]
  sq = jnp.sum(jnp.square(h) / count, axis=(1, 2))
  # The squares, divisions and the sum of t*d non-negative terms round by a
  # relative gamma_(t*d+4) at most, and each square may flush (_TINY).
  n = t * h.shape[-1] + 8
  upper = (jnp.sum(jnp.square(jnp.abs(h) + h_err) / count, axis=(1, 2))
           * (1 + 2 * n * _U / (1 - n * _U)) + n * _TINY)
  rescale = lambda x: x * jnp.exp2(e) * jnp.exp2(e)
  return rescale(sq), rescale(upper - sq) * (1 + 4 * _U)


def local_grads(layer: Layer, weights: dict[str, jax.Array], a: jax.Array,
                g: jax.Array) -> dict[str, jax.Array]:
  """Per-example gradients of a layer's parameters: [m, *shape] each.

  The layer's own VJP at each example's captured input: for a norm layer's
  scale and bias, one feature row per example (a tiny fraction of the
  model's backward); for an embedding forced to the direct route (a
  parameter mask), [vocabulary, features] per example.
  """
  def one(a_i, g_i):
    _, vjp = jax.vjp(lambda w: layer.module.apply({'params': w}, a_i),
                     weights)
    return vjp(g_i)[0]

  return jax.vmap(one)(a, g)


def _bookkept_sum(layer: Layer, weights: dict[str, jax.Array], name: str,
                  a, g_scaled):
  """sum_i d(layer)/d(name)^T g_scaled_i: the layer's weight gradient (one VJP).

  For a kernel, sum_i a_i^T g_scaled_i; for an embedding, the scaled output
  gradients scattered into the rows of their ids.
  """
  def apply(w):
    return layer.module.apply({'params': {**weights, name: w}}, a)
  _, vjp = jax.vjp(apply, weights[name])
  return vjp(g_scaled)[0]


# ----------------------------------------------------------------------------
# The clipped gradient.


class _Pass(NamedTuple):
  """What one batched forward and backward captures for a chunk of m rows."""

  losses: jax.Array          # [m]
  aux: Any
  inputs: list[jax.Array]    # per layer: a, [m, *in_shape]
  out_grads: list[jax.Array]  # per layer: g, [m, *out_shape]
  fallback: list[jax.Array]  # per fallback leaf: [m, *shape] gradients


def _capture_pass(plan: GhostPlan, loss_fn, has_aux: bool, leaves, treedef,
                  chunk, mask, args) -> _Pass:
  """Runs the loss once per row, capturing every owned layer's (a, g)."""
  layers = plan.layers
  weights = [_layer_weights(l, leaves) for l in layers]

  def one(fb_leaves, perturbations, example):
    full = list(leaves)
    for i, x in zip(plan.fallback, fb_leaves):
      full[i] = x
    capture = _Capture(layers, weights, perturbations)
    with nn.intercept_methods(capture):
      value = loss_fn(jax.tree.unflatten(treedef, full), example, *args)
    loss, aux = value if has_aux else (value, None)
    return loss, (capture.inputs, aux)

  # Perturbations derived from the mask, so that under jax.shard_map they
  # vary over the devices like the rows: the gradient of a replicated zero
  # would be summed over all devices' rows.
  rows = jnp.zeros_like(mask, jnp.float32)
  zeros = [rows.reshape(rows.shape + (1,) * len(l.out_shape))
           + jnp.zeros(l.out_shape, jnp.float32) for l in layers]
  fb_leaves = [leaves[i] for i in plan.fallback]
  (losses, (inputs, aux)), (fb_grads, out_grads) = jax.vmap(
      jax.value_and_grad(one, argnums=(0, 1), has_aux=True),
      in_axes=(None, 0, 0))(fb_leaves, zeros, chunk)
  return _Pass(losses, aux, inputs, out_grads, list(fb_grads))


class _Rows(NamedTuple):
  """One parameter's per-example squared norms, and its gradients if built."""

  sq: jax.Array               # [m]; an upper bound on the ghost route
  grads: jax.Array | None     # [m, *shape], or None: book-kept from (a, g)


def _layer_rows(layer: Layer, weights: dict[str, jax.Array], a: jax.Array,
                g: jax.Array, masks: dict[str, Any],
                norms_only: bool = False) -> dict[str, _Rows]:
  """Norms of one layer's per-example gradients, cut to a parameter mask.

  A masked kernel or embedding takes the direct route (the plan sees to it):
  a Gram identity gives the norm of the whole gradient, not of its masked
  part. ``norms_only``: an unmasked direct kernel's norm is summed tap by
  tap (:func:`direct_sq_norms`) and its gradients are not returned.
  """
  def rows(grads, name):
    grads = per_example.mask_param_grads(grads, masks[name])
    return _Rows(clipping_lib.row_sq_norm(grads), grads)

  matrix = layer.matrix
  if matrix is None or (layer.kind == 'embed'
                        and layer.norm_route == 'direct'):
    return {name: rows(x, name)
            for name, x in local_grads(layer, weights, a, g).items()}
  out = {}
  if 'bias' in weights:
    m = g.shape[0]
    bias = jnp.sum(g.reshape(m, layer.tokens, layer.features), 1)
    out['bias'] = rows(bias.reshape((m,) + layer.shape('bias')), 'bias')
  if layer.norm_route == 'direct' and norms_only and masks[matrix] is None:
    out[matrix] = _Rows(direct_sq_norms(layer, a, g), None)
    return out
  if layer.norm_route == 'direct':
    out[matrix] = rows(direct_grads(layer, a, g), matrix)
    return out
  norms = embed_sq_norms if layer.kind == 'embed' else ghost_sq_norms
  estimate, error = norms(layer, a, g)
  # Clip to an upper bound of the exact norm: never above the bound.
  out[matrix] = _Rows(jnp.maximum(estimate, 0.0) + error, None)
  return out


class _Captured(NamedTuple):
  """One capture pass's per-parameter rows, before any scale is known."""

  run: _Pass
  fallback: list[jax.Array]        # masked per-example fallback gradients
  weights: list[dict[str, jax.Array]]
  rows: list[dict[str, _Rows]]
  sq: list[jax.Array]              # per leaf: [m] squared norms


def _capture_rows(plan: GhostPlan, loss_fn, has_aux: bool, leaves, treedef,
                  masks, chunk, mask, args) -> _Captured:
  run = _capture_pass(plan, loss_fn, has_aux, leaves, treedef, chunk, mask,
                      args)
  fallback = [per_example.mask_param_grads(g, masks[i])
              for i, g in zip(plan.fallback, run.fallback)]
  weights = [_layer_weights(l, leaves) for l in plan.layers]
  rows = [_layer_rows(l, w, a, g, {n: masks[i] for n, i, _ in l.params})
          for l, w, a, g in zip(plan.layers, weights, run.inputs,
                                run.out_grads)]
  sq = [None] * len(leaves)
  for i, g in zip(plan.fallback, fallback):
    sq[i] = clipping_lib.row_sq_norm(g)
  for l, r in zip(plan.layers, rows):
    for name, i, _ in l.params:
      sq[i] = r[name].sq
  return _Captured(run, fallback, weights, rows, sq)


def _scaled_sums(plan: GhostPlan, cap: _Captured, scale, keep) -> list:
  """Per leaf, sum_i where(keep_i, scale_i * grad_i, 0), book-kept."""
  total = [None] * len(cap.sq)
  for i, g in zip(plan.fallback, cap.fallback):
    total[i] = clipping_lib.scaled_row_sum(g, scale[i], keep)
  for l, w, r, a, g in zip(plan.layers, cap.weights, cap.rows,
                           cap.run.inputs, cap.run.out_grads):
    for name, i, _ in l.params:
      if r[name].grads is not None:
        total[i] = clipping_lib.scaled_row_sum(r[name].grads, scale[i], keep)
      else:
        c = scale[i].reshape((-1,) + (1,) * (g.ndim - 1))
        total[i] = _bookkept_sum(l, w, name, _rows(keep, a),
                                 _rows(keep, g * c))
  return total


def _bookkept_sums(plan: GhostPlan, loss_fn, has_aux: bool, leaves, treedef,
                   masks, chunk, mask, scale, keep, args) -> list:
  """The book-kept clipped sums for scales already known."""
  cap = _capture_rows(plan, loss_fn, has_aux, leaves, treedef, masks, chunk,
                      mask, args)
  return _scaled_sums(plan, cap, scale, keep)


def _clipped_chunk(plan: GhostPlan, loss_fn, has_aux: bool,
                   clipping: clipping_lib.PerExampleClipping, leaves,
                   treedef, param_mask, chunk, mask, clip_state, args):
  """The :func:`dpjax.per_example.microbatched` chunk function of the route."""
  masks = ([None] * len(leaves) if param_mask is None
           else jax.tree.leaves(param_mask))
  cap = _capture_rows(plan, loss_fn, has_aux, leaves, treedef, masks, chunk,
                      mask, args)
  scales, clip_state = clipping.scales_from_norms(
      jax.tree.unflatten(treedef, cap.sq), clip_state, mask)
  total = _scaled_sums(plan, cap, jax.tree.leaves(scales.scales),
                       scales.keep)
  out = clipping_lib.ClipOutput(
      jax.tree.unflatten(treedef, total), scales.norms, scales.num_nonfinite,
      scales.num_clipped)
  return out, clip_state, jnp.where(mask, cap.run.losses, 0.0), cap.run.aux


# ----------------------------------------------------------------------------
# The 'memory' policy: norms inside the backward, then one weighted backward.


def _norm_probe(layer: Layer) -> Callable[..., jax.Array]:
  """``probe(y, x, weights, masks, slot) = y``; the slot's cotangent is norms.

  The identity on the layer's output ``y``, whose VJP passes the output
  gradient ``g`` through unchanged and returns, as the cotangent of
  ``slot`` (one entry per parameter of the layer), the squared norms of
  this example's gradients of the layer's parameters, from ``x`` and ``g``.
  So one backward yields every layer's per-example norms while no layer's
  ``g`` outlives its own step of the backward: nothing per example is kept
  but the norms (Opacus' ghost clipping, Li et al. 2022, in one pass).
  """
  @jax.custom_vjp
  def probe(y, x, weights, masks, slot):
    del x, weights, masks, slot
    return y

  def fwd(y, x, weights, masks, slot):
    del slot
    return y, (x, weights, masks)

  def bwd(residuals, g):
    x, weights, masks = residuals
    rows = _layer_rows(layer, weights, x[None], g[None], masks,
                       norms_only=True)
    sq = jnp.stack([rows[name].sq[0] for name, _, _ in layer.params])
    return g, None, None, None, sq

  probe.defvjp(fwd, bwd)
  return probe


def _norms_pass(plan: GhostPlan, loss_fn, has_aux: bool, leaves, treedef,
                masks, chunk, mask, args):
  """(losses, aux, per-leaf [m] squared norms)."""
  layers = plan.layers
  weights = [_layer_weights(l, leaves) for l in layers]
  layer_masks = [{n: masks[i] for n, i, _ in l.params} for l in layers]
  probes = [_norm_probe(l) for l in layers]

  def one(fb_leaves, slots, example):
    full = list(leaves)
    for i, x in zip(plan.fallback, fb_leaves):
      full[i] = x
    wrap = lambda j, x, y: probes[j](y, x, weights[j], layer_masks[j],
                                     slots[j])
    with nn.intercept_methods(_Capture(layers, weights, None, wrap)):
      value = loss_fn(jax.tree.unflatten(treedef, full), example, *args)
    loss, aux = value if has_aux else (value, None)
    return loss, aux

  # Slots derived from the mask: under jax.shard_map they vary like the rows.
  rows = jnp.zeros_like(mask, jnp.float32)[:, None]
  slots = [rows + jnp.zeros(len(l.params), jnp.float32) for l in layers]
  fb_leaves = [leaves[i] for i in plan.fallback]
  (losses, aux), (fb_grads, layer_sq) = jax.vmap(
      jax.value_and_grad(one, argnums=(0, 1), has_aux=True),
      in_axes=(None, 0, 0))(fb_leaves, slots, chunk)
  fallback = [per_example.mask_param_grads(g, masks[i])
              for i, g in zip(plan.fallback, fb_grads)]
  sq = [None] * len(leaves)
  for i, g in zip(plan.fallback, fallback):
    sq[i] = clipping_lib.row_sq_norm(g)
  for l, s in zip(layers, layer_sq):
    for k, (_, i, _) in enumerate(l.params):
      sq[i] = s[:, k]
  return losses, aux, sq


# Pass 1 runs in at most this many slices of the chunk, one after another.
NORM_SLICES = 8


def norm_slices(m: int) -> int:
  """How many slices of an m-example chunk pass 1 of 'memory' runs in.

  Pass 1 holds, beside the activations, a few temporaries as large as the
  layer it is at (a conv's shifted input and output gradient per tap), so
  over the whole chunk it would peak far above the weighted pass (2.5x the
  non-private step on a CIFAR CNN at B = 1024). In slices, it peaks at a
  fraction of that while the weighted pass, over the whole chunk, sets the
  step's peak; the flops are the same. The largest divisor of m up to
  :data:`NORM_SLICES`.

  Examples:
    >>> from dpjax import ghost
    >>> ghost.norm_slices(1024), ghost.norm_slices(12), ghost.norm_slices(7)
    (8, 6, 7)
  """
  return max(k for k in range(1, min(NORM_SLICES, m) + 1) if m % k == 0)


def _sliced_norms_pass(plan: GhostPlan, loss_fn, has_aux: bool, leaves,
                       treedef, masks, chunk, mask, args):
  """:func:`_norms_pass` over :func:`norm_slices` slices, one after another."""
  m = mask.shape[0]
  k = norm_slices(m)
  if k == 1:
    return _norms_pass(plan, loss_fn, has_aux, leaves, treedef, masks, chunk,
                       mask, args)
  split = lambda x: x.reshape((k, m // k) + x.shape[1:])
  merge = lambda x: x.reshape((m,) + x.shape[2:])
  out = jax.lax.map(
      lambda part: _norms_pass(plan, loss_fn, has_aux, leaves, treedef, masks,
                               part[0], part[1], args),
      (jax.tree.map(split, chunk), split(mask)))
  return jax.tree.map(merge, out)


def _weighted_grad(loss_fn, has_aux: bool, leaves, treedef, chunk, keep,
                   scale, args):
  """sum_i where(keep_i, scale_i, 0) grad loss_i: one non-private backward.

  Rows not kept are replaced by a kept row before the forward (weight 0), so
  that a NaN or Inf row cannot reach the sum through 0 * NaN in the
  backward; with no kept row the sum is exactly zero.
  """
  m = keep.shape[0]
  src = jnp.where(keep, jnp.arange(m), jnp.argmax(keep))
  safe = jax.tree.map(lambda x: jnp.take(x, src, axis=0), chunk)
  weight = jnp.where(keep, scale, 0.0)

  def total(leaves):
    params = jax.tree.unflatten(treedef, leaves)
    value = jax.vmap(lambda ex: loss_fn(params, ex, *args))(safe)
    losses = value[0] if has_aux else value
    return jnp.sum(weight * losses)

  return [jnp.where(jnp.any(keep), g, 0) for g in jax.grad(total)(leaves)]


def _memory_chunk(plan: GhostPlan, loss_fn, has_aux: bool,
                  clipping: clipping_lib.PerExampleClipping, leaves,
                  treedef, param_mask, chunk, mask, clip_state, args):
  """The chunk function of the 'memory' policy (two passes).

  Pass 1 computes every per-example norm inside one backward
  (:func:`_norm_probe`); pass 2 is the weighted backward
  :func:`_weighted_grad`, exact when the clipping scales every parameter
  of an example alike (flat, automatic, normalized, adaptive flat). A
  clipping with per-layer scales gets its sums from the book-keeping pass.
  """
  masks = ([None] * len(leaves) if param_mask is None
           else jax.tree.leaves(param_mask))
  losses, aux, sq = _sliced_norms_pass(plan, loss_fn, has_aux, leaves,
                                       treedef, masks, chunk, mask, args)
  scales, clip_state = clipping.scales_from_norms(
      jax.tree.unflatten(treedef, sq), clip_state, mask)
  scale, keep = jax.tree.leaves(scales.scales), scales.keep
  if len({id(s) for s in scale}) == 1:
    total = _weighted_grad(loss_fn, has_aux, leaves, treedef, chunk, keep,
                           scale[0], args)
    total = [g if k is None else jnp.where(k, g, 0)
             for g, k in zip(total, masks)]
  else:
    total = _bookkept_sums(plan, loss_fn, has_aux, leaves, treedef, masks,
                           chunk, mask, scale, keep, args)
  out = clipping_lib.ClipOutput(
      jax.tree.unflatten(treedef, total), scales.norms, scales.num_nonfinite,
      scales.num_clipped)
  return out, clip_state, jnp.where(mask, losses, 0.0), aux


def clipped_grad(
    loss_fn: Callable[..., Any],
    clipping: clipping_lib.PerExampleClipping,
    *,
    microbatch_size: int | None = None,
    has_aux: bool = False,
    norm_route: str = 'speed',
) -> Callable[..., per_example.ClippedGrad]:
  """:func:`dpjax.clipped_grad` by ghost norms and book-keeping.

  Same arguments, function ``fn(params, batch, mask, *, clip_state=None,
  args=(), param_mask=None)`` and result (equal within float32 tolerance)
  for every clipping that clips from norms (:func:`route_refusal`), but
  supported layers never get per-example gradients from ``vmap``: their
  per-example norms come from the layer's inputs and output gradients. On
  'speed' (and 'ghost' / 'direct') these are captured in one batched
  forward and backward and the clipped sum is book-kept from the same
  tensors; on 'memory' the norms are computed inside one backward and the
  clipped sum is one weighted backward (:func:`_memory_chunk`), so nothing
  per example is kept but the norms. Other parameters (:func:`make_plan`)
  take the vmap route in the same pass.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import dpjax
    >>> from dpjax import ghost
    >>> model = nn.Dense(2)
    >>> def loss(p, ex):
    ...   return jnp.sum(model.apply({'params': p}, ex['x']) ** 2)
    >>> params = model.init(jax.random.key(0), jnp.ones(3))['params']
    >>> batch = {'x': jnp.arange(12.0).reshape(4, 3) / 10}
    >>> clip = dpjax.clip_per_example(1.0)
    >>> out = jax.jit(ghost.clipped_grad(loss, clip))(params, batch, None)
    >>> ref = jax.jit(dpjax.clipped_grad(loss, clip))(params, batch, None)
    >>> bool(jnp.allclose(out.grad_sum['kernel'], ref.grad_sum['kernel'],
    ...                   rtol=1e-5))
    True

  Args:
    loss_fn: ``loss_fn(params, example, *args)`` for ONE example.
    clipping: a :class:`dpjax.PerExampleClipping` with ``scales_from_norms``.
    microbatch_size: rows per chunk (None: the whole batch at once).
      Performance only.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    norm_route: per-layer norm computation (:func:`choose_norm_route`):
      'speed' (the faster route per layer), 'memory' (the smaller per
      layer, and two passes that keep only the norms per example), or
      'ghost' / 'direct' for every layer.

  Returns:
    A function returning :class:`dpjax.ClippedGrad`. Call it under jax.jit.

  References:
    Li et al., 2022. Large Language Models Can Be Strong Differentially
    Private Learners. https://arxiv.org/abs/2110.05679
    Bu et al., 2023. Differentially Private Optimization on Large Model at
    Small Cost. https://arxiv.org/abs/2210.00038
  """
  if (refusal := route_refusal(clipping)) is not None:
    raise ValueError(refusal)
  choose_norm_route(1, 1, 1, norm_route)
  per_example.check_microbatch_size(microbatch_size)
  vmap_fn = per_example.clipped_grad(
      loss_fn, clipping, microbatch_size=microbatch_size, has_aux=has_aux)

  def fn(params, batch, mask=per_example.MASK_REQUIRED, *, clip_state=None,
         args=(), param_mask=None):
    batch, mask = per_example.examples_and_mask(batch, mask)
    per_example.check_param_mask(params, param_mask)
    leaves, treedef = jax.tree.flatten(params)
    example = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)),
        batch)
    # A Gram norm is of the whole layer gradient, not of its masked part.
    plan = make_plan(loss_fn, params, example, args, has_aux=has_aux,
                     norm_route=norm_route if param_mask is None else 'direct')
    if not plan.layers:
      return vmap_fn(params, batch, mask, clip_state=clip_state, args=args,
                     param_mask=param_mask)
    chunk_fn = _memory_chunk if norm_route == 'memory' else _clipped_chunk
    run = functools.partial(chunk_fn, plan, loss_fn, has_aux, clipping,
                            leaves, treedef, param_mask)
    return per_example.microbatched(run, params, batch, mask, clip_state,
                                    clipping, microbatch_size, args)

  return fn


def route_refusal(clipping: clipping_lib.PerExampleClipping, *,
                  stats_through_public: bool = False) -> str | None:
  """Why the ghost and book-keeping routes cannot compute a clipped sum.

  None when they can: the clipping clips from per-example norms (flat, per
  layer with either group kind and noise, adaptive flat or per layer,
  automatic, normalized), with or without a parameter mask (pass it as
  ``param_mask=`` to the engine, not folded into the loss) and whatever
  model state the loss reads (BatchNorm in inference mode with given
  statistics: 'frozen', 'privatized', 'public'). Otherwise one line saying
  why, for the engine selector: 'auto' then takes the vmap route, an
  explicit route is an error. The reasons are about speed, not privacy:
  every route computes the same clipped sum.

  Examples:
    >>> import dpjax
    >>> from dpjax import ghost
    >>> ghost.route_refusal(dpjax.clip_per_layer({'w': 1.0})) is None
    True
    >>> ghost.route_refusal(dpjax.clip_l2_then_linf(1.0, 4.0))[:24]
    "clipping 'l2_then_linf' "

  Args:
    clipping: the clipping of the run.
    stats_through_public: whether the loss recomputes BatchNorm statistics
      from a public batch with gradients through them ('public' with
      ``stats_gradient``).

  Returns:
    None, or the reason.
  """
  if clipping.scales_from_norms is None:
    return (f'clipping {clipping.name!r} needs each per-example gradient'
            ' itself, not only its norms (an L-inf clamp, a group gradient or'
            ' a custom clip function), so it runs on the vmap route: set'
            " perf.grad_route='auto' (or 'vmap').")
  if stats_through_public:
    return ('the loss recomputes BatchNorm statistics from the public batch'
            ' with gradients through them (normalization.stats_gradient), so'
            ' every layer also runs on that batch and its per-example'
            ' gradient has a term through the statistics that the captured'
            " layer tensors do not hold: set perf.grad_route='auto' (or"
            " 'vmap').")
  return None


GRAD_ROUTES = ('auto', 'vmap', 'ghost', 'bookkeeping')
# 'auto' takes the vmap route below this many parameters: there the B x P
# per-example gradients are small and one vmapped backward beats the
# captured layer tensors (measured: docs/BENCHMARKS.md, issue 8).
AUTO_MIN_PARAMS = 100_000


def clipped_grad_for_route(
    route: str,
    loss_fn: Callable[..., Any],
    clipping: clipping_lib.PerExampleClipping,
    *,
    microbatch_size: int | None = None,
    has_aux: bool = False,
    stats_through_public: bool = False,
) -> Callable[..., per_example.ClippedGrad]:
  """The clipped-gradient function of a route named in ``config.perf``.

  'vmap': per-example gradients by vmap (:func:`dpjax.clipped_grad`).
  'bookkeeping': this module with the faster norm per layer ('speed').
  'ghost': this module with the smaller norm per layer ('memory').
  'auto': 'bookkeeping' when :func:`route_refusal` has no objection and
  the model has at least :data:`AUTO_MIN_PARAMS` parameters, else 'vmap' (a
  model without supported layers runs the vmap route either way); an
  explicit 'ghost' or 'bookkeeping' with an objection logs it and runs
  'vmap': the route is a performance setting, never a refusal. Every
  function takes ``param_mask=`` (:func:`clipped_grad`). All routes compute
  the same clipped sum: the route is a performance setting.

  Examples:
    >>> import jax.numpy as jnp
    >>> import dpjax
    >>> from dpjax import ghost
    >>> fn = ghost.clipped_grad_for_route('auto', lambda p, x: p @ x['x'],
    ...                                   dpjax.clip_per_example(1.0))
    >>> out = fn(jnp.ones(3), {'x': jnp.eye(3)}, mask=None)
    >>> [round(float(v), 4) for v in out.grad_sum]
    [1.0, 1.0, 1.0]
  """
  if route not in GRAD_ROUTES:
    raise ValueError(
        f'grad_route must be one of {GRAD_ROUTES}, got {route!r}.')
  vmap_fn = per_example.clipped_grad(loss_fn, clipping,
                                     microbatch_size=microbatch_size,
                                     has_aux=has_aux)
  refusal = route_refusal(clipping, stats_through_public=stats_through_public)
  if refusal is not None and route in ('ghost', 'bookkeeping'):
    logging.warning("perf.grad_route=%r runs as 'vmap': %s", route, refusal)
  if route == 'vmap' or refusal is not None:
    return vmap_fn
  ghost_fn = clipped_grad(
      loss_fn, clipping, microbatch_size=microbatch_size, has_aux=has_aux,
      norm_route='memory' if route == 'ghost' else 'speed')
  if route != 'auto':
    return ghost_fn

  def fn(params, batch, mask=per_example.MASK_REQUIRED, *, clip_state=None,
         args=(), param_mask=None):
    size = sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(params))
    chosen = vmap_fn if size < AUTO_MIN_PARAMS else ghost_fn
    return chosen(params, batch, mask, clip_state=clip_state, args=args,
                  param_mask=param_mask)

  return fn
