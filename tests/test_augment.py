"""Tests for dpjax/augment.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import augment
from dpjax import augmult

IMAGE = jnp.arange(6 * 5 * 2, dtype=jnp.float32).reshape(6, 5, 2) + 1


def _windows(image, padding):
  padded = np.pad(np.asarray(image), ((padding,) * 2, (padding,) * 2, (0, 0)))
  h, w = image.shape[:2]
  return {(dy, dx): padded[dy:dy + h, dx:dx + w]
          for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)}


def test_random_crop_is_a_window_of_the_padded_image_and_covers_all():
  windows = _windows(IMAGE, 2)
  crop = jax.jit(jax.vmap(augment.random_crop, (0, None, None)),
                 static_argnums=2)
  outs = np.asarray(crop(jax.random.split(jax.random.key(0), 400), IMAGE, 2))
  seen = set()
  for out in outs:
    matches = [k for k, win in windows.items() if np.array_equal(out, win)]
    assert len(matches) == 1
    seen.add(matches[0])
  assert seen == set(windows)  # every offset in [0, 2p] x [0, 2p] occurs


def test_random_flip_mirrors_half_the_time():
  flip = jax.jit(jax.vmap(augment.random_flip, (0, None)))
  outs = np.asarray(flip(jax.random.split(jax.random.key(1), 2000), IMAGE))
  flipped = np.array([np.array_equal(o, IMAGE[:, ::-1]) for o in outs])
  kept = np.array([np.array_equal(o, IMAGE) for o in outs])
  assert np.all(flipped ^ kept)
  assert 0.45 < flipped.mean() < 0.55


def test_augmentations_are_pure_and_per_example():
  """Same key, same image; a batch under vmap is each example on its own."""
  keys = jax.random.split(jax.random.key(2), 3)
  images = jnp.stack([IMAGE, IMAGE * 2, IMAGE * 3])
  batch = jax.vmap(augment.crop_and_flip)(keys, images)
  one = jax.jit(augment.crop_and_flip)
  for i in range(3):
    np.testing.assert_array_equal(batch[i], one(keys[i], images[i]))
    np.testing.assert_array_equal(one(keys[i], images[i]),
                                  one(keys[i], images[i]))
  changed = jax.vmap(augment.crop_and_flip)(keys, images.at[1].set(-5.0))
  np.testing.assert_array_equal(changed[0], batch[0])
  np.testing.assert_array_equal(changed[2], batch[2])


@pytest.mark.parametrize('name', ['crop', 'flip', 'crop_flip'])
def test_registered_for_augmult(name):
  out = augmult.get_augmentation(name)(jax.random.key(0), IMAGE)
  assert out.shape == IMAGE.shape and out.dtype == IMAGE.dtype
  assert augmult.AUGMENTATIONS[name].__module__ == 'dpjax.augment'


def test_bad_arguments():
  with pytest.raises(ValueError, match='padding'):
    augment.random_crop(jax.random.key(0), IMAGE, -1)
