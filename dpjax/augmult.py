"""Augmentation multiplicity: K augmented views of each example, one gradient.

De et al. 2022 ("Unlocking High-Accuracy Differentially Private Image
Classification through Scale") average each example's gradient over K
augmented views of it BEFORE clipping: the averaged gradient is still one
example's contribution, so per-example clipping bounds it by C and the
sensitivity, the noise and the accounting are those of plain DP-SGD, while the
gradient's variance shrinks with K.

Here that is a wrapper of the one-example loss: the mean of the loss over the
K views, whose gradient is the mean of the per-view gradients; the engine
(:func:`dpjax.clipped_grad`) then clips it like any per-example gradient.
Privacy invariant touched (DESIGN.md, 1): views never leave their example, so
one example still moves the clipped sum by at most the clipping bound.

Augmentations are pure functions ``augment(key, image) -> image`` on ONE
example image [H, W, C] (as in :mod:`dpjax.augment`); each example's views come
from a key folded from (step key, example index), so they do not depend on the
batch's padding, its split into physical batches or the number of devices.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from dpjax import augment as augment_lib
from dpjax import keys as keys_lib

Augment = Callable[[jax.Array, jax.Array], jax.Array]
LossFn = Callable[..., Any]


def random_shift(key: jax.Array, image: jax.Array, max_shift: int = 1
                 ) -> jax.Array:
  """Translates ``image`` [H, W, C] by up to ``max_shift`` pixels, zero-filled.

  The random crop of a zero-padded image (Krizhevsky et al. 2012), with the
  padding ``max_shift`` scaled to small images.
  """
  h, w = image.shape[:2]
  padded = jnp.pad(image, ((max_shift, max_shift), (max_shift, max_shift),
                           (0, 0)))
  dy, dx = jax.random.randint(key, (2,), 0, 2 * max_shift + 1)
  return jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, image.shape[2]))


random_flip = augment_lib.random_flip

AUGMENTATIONS: dict[str, Augment] = {
    'flip': random_flip,
    'shift': random_shift,
    # The standard CIFAR crop (padding 4) and crop + flip: dpjax/augment.py.
    'crop': augment_lib.random_crop,
    'crop_flip': augment_lib.crop_and_flip,
}


def compose(augments: Sequence[Augment]) -> Augment:
  """One augmentation applying ``augments`` in order, each with its own key."""
  augments = tuple(augments)

  def augment(key, image):
    for k, fn in zip(jax.random.split(key, len(augments)), augments):
      image = fn(k, image)
    return image

  return augment


def get_augmentation(names: Sequence[str]) -> Augment:
  """The composition of the augmentations named in :data:`AUGMENTATIONS`."""
  if isinstance(names, str):
    names = (names,)
  unknown = [n for n in names if n not in AUGMENTATIONS]
  if unknown or not names:
    raise ValueError(
        f'unknown augmentation(s) {unknown or list(names)}; known:'
        f' {sorted(AUGMENTATIONS)}.')
  return compose([AUGMENTATIONS[n] for n in names])


def example_key(key: jax.Array, index: jax.Array) -> jax.Array:
  """The augmentation key of the example with dataset index ``index``."""
  return jax.random.fold_in(key, index)


def _check_num_views(num_views: int) -> None:
  if isinstance(num_views, bool) or not isinstance(num_views, int) or (
      num_views < 1):
    raise ValueError(
        f'num_views must be an integer >= 1, got {num_views!r}.')


def average_over_views(loss_fn: LossFn, augment: Augment, num_views: int, *,
                       field: str = 'image') -> LossFn:
  """The one-example loss averaged over ``num_views`` augmented views.

  Returns ``fn(params, example, inputs)`` equal to
  ``mean_k loss_fn(params, example with field <- augment(key_k, image),
  inputs)``, where the ``num_views`` keys ``key_k`` are split off
  ``fold_in(inputs.aug_key, example['index'])``. Its gradient is the mean of
  the per-view gradients, which the engine clips as ONE example's gradient.
  A loss with auxiliary outputs (``(loss, aux)``, e.g. per-example BatchNorm
  moments) gets the mean of the per-view aux too.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import dpjax
    >>> from dpjax import augmult
    >>> loss = lambda w, ex, inputs: jnp.sum(w * ex['image'])
    >>> negate = lambda key, image: -image     # a deterministic "augmentation"
    >>> avg = augmult.average_over_views(loss, negate, num_views=2)
    >>> ex = {'image': jnp.ones(3), 'index': 5}
    >>> inputs = dpjax.StepInputs(aug_key=jax.random.key(0))
    >>> float(avg(jnp.ones(3), ex, inputs))
    -3.0

  Args:
    loss_fn: ``loss_fn(params, example, inputs) -> scalar`` (or ``(scalar,
      aux)``) for ONE example (:class:`dpjax.StepInputs`).
    augment: ``augment(key, image) -> image`` on one example image.
    num_views: K >= 1, views per example.
    field: the example's field the augmentation applies to.

  Returns:
    The averaged loss; the example must carry an integer ``'index'`` (its
    position in the dataset) and ``inputs`` the step's ``aug_key``.

  References:
    De et al., 2022. Unlocking High-Accuracy Differentially Private Image
    Classification through Scale. https://arxiv.org/abs/2204.13650
  """
  _check_num_views(num_views)

  def averaged(params, example, inputs):
    if 'index' not in example:
      raise ValueError(
          "augmentation multiplicity needs each example's dataset index:"
          " add 'index' to the batch.")
    if inputs.aug_key is None:
      raise ValueError('augmentation multiplicity needs StepInputs(aug_key=...)'
                       ' (the step key of stream keys.AUGMENT).')
    keys = jax.random.split(example_key(inputs.aug_key, example['index']),
                            num_views)
    views = jax.vmap(augment, in_axes=(0, None))(keys, example[field])

    def view_loss(view):
      return loss_fn(params, {**example, field: view}, inputs)

    return jax.tree.map(lambda x: jnp.mean(x, axis=0),
                        jax.vmap(view_loss)(views))

  return averaged


def views_of_group(group_loss_fn: Callable[..., Any], augment: Augment,
                   num_views: int, *, field: str = 'image'
                   ) -> Callable[..., Any]:
  """A group loss over the ``num_views`` views of each of its rows.

  For a loss that couples the rows of a group (BatchNorm in training mode
  inside a batch-clipping group, or over the non-private baseline's batch):
  ``fn(params, group, group_mask, inputs)`` runs ``group_loss_fn`` on the
  m * K rows of the group's views (row i's views drawn as in
  :func:`average_over_views`, each carrying row i's mask). A group loss that
  is a mean over its rows then averages each example's views, and a view
  never leaves its example's group, so batch clipping's bound is unchanged.

  Args:
    group_loss_fn: ``group_loss_fn(params, group, group_mask, inputs)``, a
      mean over the group's rows (or ``(mean, aux)``).
    augment: ``augment(key, image) -> image`` on one example image.
    num_views: K >= 1, views per example.
    field: the examples' field the augmentation applies to.

  Returns:
    The group loss over views; rows must carry ``'index'`` and ``inputs``
    the step's ``aug_key``.

  References:
    De et al., 2022. Unlocking High-Accuracy Differentially Private Image
    Classification through Scale. https://arxiv.org/abs/2204.13650
  """
  _check_num_views(num_views)

  def over_views(params, group, group_mask, inputs):
    if 'index' not in group or inputs.aug_key is None:
      raise ValueError(
          "augmentation multiplicity needs each example's dataset index"
          " ('index' in the batch) and StepInputs(aug_key=...).")

    def views(index, image):
      keys = jax.random.split(example_key(inputs.aug_key, index), num_views)
      return jax.vmap(augment, in_axes=(0, None))(keys, image)

    images = jax.vmap(views)(group['index'], group[field])  # [m, K, ...]
    rows = images.shape[0] * num_views
    expand = lambda x: jnp.repeat(x, num_views, axis=0)
    expanded = {k: expand(v) for k, v in group.items() if k != field}
    expanded[field] = images.reshape((rows,) + images.shape[2:])
    return group_loss_fn(params, expanded, expand(group_mask), inputs)

  return over_views


class AugMult(NamedTuple):
  """A training run's augmentation multiplicity: what, how many views, key.

  ``loss(loss_fn)`` is :func:`average_over_views`; ``step_key(step)`` the key
  of logical step ``step``, a pure function of (key, step) like the sampler,
  so resumed and multi-device runs draw the same views. ``key`` is the
  augmentation stream's root (``KeySchedule.root(keys.AUGMENT)``): a stream
  of its own, so no view ever reuses the bits of a noise draw.
  """

  augment: Augment
  num_views: int
  key: jax.Array

  def loss(self, loss_fn: LossFn) -> LossFn:
    return average_over_views(loss_fn, self.augment, self.num_views)

  def group_loss(self, group_loss_fn: Callable[..., Any]
                 ) -> Callable[..., Any]:
    return views_of_group(group_loss_fn, self.augment, self.num_views)

  def step_key(self, step: jax.Array | int) -> jax.Array:
    return keys_lib.for_step(self.key, step)
