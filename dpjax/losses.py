"""The classification loss of the losses dpjax builds, with validated labels.

Privacy invariant 7 (the API cannot be misused silently): a label outside
``[0, K)`` is a record outside the declared domain. optax's integer-label
cross-entropy gives label K a NaN loss whose gradient is still finite (and
used), and label -1 the loss of class K-1 (negative indexing). Here such a
row is handled per record, like a non-finite gradient in the clipping: its
loss is 0 and its gradient exactly 0, so it contributes nothing, whatever the
engine. How many rows a dataset has outside the domain is reported to the
data owner's console as a count (:func:`dpjax.config_validation.check_splits`),
never as a value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def valid_labels(labels: jax.Array, num_classes: int) -> jax.Array:
  """Boolean mask of the integer ``labels`` that lie in ``[0, num_classes)``."""
  return (labels >= 0) & (labels < num_classes)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy per row; 0 (and no gradient) for invalid labels.

  Examples:
    >>> import jax.numpy as jnp
    >>> logits = jnp.zeros((3, 2))
    >>> [round(float(v), 4) for v in cross_entropy(logits, jnp.array([1, 2, -1]))]
    [0.6931, 0.0, 0.0]

  Args:
    logits: [..., K] scores.
    labels: [...] integer labels.

  Returns:
    [...] per-row losses.
  """
  num_classes = logits.shape[-1]
  valid = valid_labels(labels, num_classes)
  # The loss of a clipped label keeps the unselected branch finite, so its
  # zero cotangent cannot turn into NaN in the backward pass.
  safe = jnp.clip(labels, 0, num_classes - 1)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  return jnp.where(valid, loss, 0.0)
