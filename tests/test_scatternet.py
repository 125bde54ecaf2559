"""Tests for dpjax/scatternet.py: the scattering transform against Kymatio and
against its analytic properties, and the models over its features."""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import config_validation
from dpjax import models
from dpjax import scatternet


# Compiled once per shape: eager scattering dispatches hundreds of small ops.
scattering = jax.jit(scatternet.scattering, static_argnums=(1, 2, 3))


def _images(shape, n=3, seed=0):
  return np.random.default_rng(seed).random((n,) + shape).astype(np.float32)


@pytest.mark.parametrize('shape', [(32, 32, 3), (28, 28, 1), (8, 8, 1)])
def test_matches_kymatio(shape):
  kymatio_2d = pytest.importorskip(
      'kymatio.scattering2d.frontend.numpy_frontend',
      reason="the reference implementation is a test extra: pip install -e"
             " '.[test]' (kymatio)")
  x = _images(shape)
  ref = kymatio_2d.ScatteringNumPy2D(J=2, shape=shape[:2], L=8)(
      np.moveaxis(x, -1, 1))                       # [n, C, 81, h, w]
  ref = np.moveaxis(ref.reshape((len(x), -1) + ref.shape[-2:]), 1, -1)
  out = np.asarray(scattering(x))
  assert out.shape == ref.shape
  # Kymatio normalizes its Gaussians with 3.1415 for pi: 3e-5 relative.
  np.testing.assert_allclose(out, ref, rtol=2e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize('J,L,order', [(2, 8, 2), (2, 8, 1), (3, 4, 2),
                                       (1, 6, 2)])
def test_shapes_and_channel_counts(J, L, order):
  x = _images((16, 16, 2), n=2)
  out = scattering(x, J, L, order)
  k = scatternet.num_channels(J, L, order)
  side = scatternet.output_size(16, J)
  assert out.shape == (2, side, side, 2 * k)
  assert k == 1 + J * L + (order == 2) * L * L * J * (J - 1) // 2
  assert side == 16 // 2**J


def test_jit_vmap_and_unbatched_agree():
  x = _images((16, 16, 1), n=3)
  batched = np.asarray(scattering(x))
  np.testing.assert_allclose(jax.jit(jax.vmap(scatternet.scattering))(x),
                             batched, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scattering(x[0]), batched[0], rtol=1e-5,
                             atol=1e-6)


def test_channels_are_transformed_independently_and_contiguously():
  x = _images((16, 16, 3), n=1)
  out = np.asarray(scattering(x))
  for c in range(3):
    alone = np.asarray(scattering(x[..., c:c + 1]))
    np.testing.assert_allclose(out[..., 81 * c:81 * (c + 1)], alone,
                               rtol=1e-5, atol=1e-6)


def test_constant_image_has_only_its_average():
  """phi has unit gain and every wavelet zero mean: a constant image keeps
  its value in order 0 and has no energy in orders 1 and 2."""
  out = np.asarray(scattering(jnp.full((1, 16, 16, 1), 2.5)))
  np.testing.assert_allclose(out[..., 0], 2.5, rtol=1e-5)
  assert np.abs(out[..., 1:]).max() < 1e-5


def test_positive_homogeneity():
  x = _images((16, 16, 1))
  np.testing.assert_allclose(scattering(3.0 * x), 3.0 * scattering(x),
                             rtol=1e-4, atol=1e-5)


def test_approximately_invariant_to_small_translations():
  """A one-pixel shift of a sharp texture moves its pixels by 73% of their
  norm but its features (2**J = 4-pixel averages of moduli) by ~13%."""
  texture = np.random.default_rng(0).random((32, 32))
  x = np.pad(texture, 8)[None, :, :, None].astype(np.float32)
  moved = np.roll(x, 1, axis=1)
  pixel_change = np.linalg.norm(moved - x) / np.linalg.norm(x)
  s, s_moved = scattering(x), scattering(moved)
  feature_change = float(jnp.linalg.norm(s_moved - s) / jnp.linalg.norm(s))
  assert feature_change < 0.25 * pixel_change


def test_filter_bank_values():
  bank = scatternet.filter_bank(40, 40, J=2, L=8)
  # The low-pass keeps the mean; wavelets have none.
  assert bank.phi[0][0, 0] == pytest.approx(1.0, abs=1e-5)
  assert bank.phi[1][0, 0] == pytest.approx(1.0, abs=1e-5)
  for j in range(2):
    assert np.abs(bank.psi[j][0][:, 0, 0]).max() < 1e-5
  # Each wavelet's spectrum peaks near xi = 3 pi / 4 / 2**j in its direction.
  freqs = np.fft.fftfreq(40) * 2 * math.pi
  for j in range(2):
    for l in range(8):
      theta = (8 // 2 - 1 - l) * math.pi / 8
      r, c = np.unravel_index(np.argmax(bank.psi[j][0][l]), (40, 40))
      peak = np.array([freqs[r], freqs[c]])
      want = 3 * math.pi / 4 / 2**j * np.array([math.cos(theta),
                                                 math.sin(theta)])
      assert np.linalg.norm(peak - want) < 2 * 2 * math.pi / 40, (j, l)
  # Coarser resolutions are the low band of the full spectrum.
  np.testing.assert_array_equal(bank.phi[1][:10, :10], bank.phi[0][:10, :10])
  np.testing.assert_array_equal(bank.phi[1][-10:, -10:],
                                bank.phi[0][-10:, -10:])


def test_bad_settings_and_inputs_are_clear_errors():
  with pytest.raises(ValueError, match='order must be 1 or 2'):
    scatternet.scattering(jnp.zeros((1, 8, 8, 1)), order=3)
  with pytest.raises(ValueError, match='J must be an integer'):
    scatternet.num_channels(0)
  with pytest.raises(ValueError, match='too small'):
    scatternet.scattering(jnp.zeros((1, 4, 4, 1)), J=3)
  with pytest.raises(ValueError, match=r'\[\.\.\., H, W, C\]'):
    scatternet.scattering(jnp.zeros((8, 8)))


@pytest.mark.parametrize('name,shape,params', [
    ('scatter_linear', (8, 8, 243), 155530),
    ('scatter_linear', (7, 7, 81), 39700),
    ('scatter_cnn', (8, 8, 243), 139968 + 36864 + 10250),
    ('scatter_cnn', (7, 7, 81), 46656 + 36864 + 10250),
    # Their CIFAR10_CNN: convs with biases, Dense(64 * 4 * 4, 10).
    ('scatter_cnn_tb', (8, 8, 243), 139968 + 64 + 36864 + 64 + 10250),
    # Their MNIST_CNN: conv(16, stride 2), conv(32), Dense(32 * 4 * 4, 32).
    ('scatter_cnn_tb', (7, 7, 81), 11664 + 16 + 4608 + 32 + 16416 + 330),
])
def test_model_shapes_and_sizes(name, shape, params):
  model = models.get_model(name, 10, affine=False)  # GroupNorm, no affine
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jnp.zeros((1,) + shape))
  assert sum(x.size for x in jax.tree.leaves(variables['params'])) == params
  logits = jax.eval_shape(model.apply, variables,
                          jnp.zeros((3,) + shape, jnp.float16))
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32


@pytest.mark.parametrize('norm,scale_norm', [('none', False), ('group', True),
                                             ('batch', True)])
def test_cnn_normalization_options(norm, scale_norm):
  model = models.get_model('scatter_cnn', 10, norm=norm, scale_norm=scale_norm,
                           width=0.25)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 7, 7, 81)))
  assert ('batch_stats' in variables) == (norm == 'batch')
  names = set(variables['params'])
  assert ('scale_norm' in names) == scale_norm
  logits = jax.jit(model.apply)(variables, jnp.ones((2, 7, 7, 81)))
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))


def test_scatter_model_options_are_checked():
  with pytest.raises(ValueError, match='no scale_norm, width or activation'):
    models.get_model('scatter_linear', 10, width=2.0)
  with pytest.raises(ValueError, match='fixed beyond its feature norm'):
    models.get_model('scatter_cnn_tb', 10, activation='relu')
  with pytest.raises(ValueError, match='scale_norm needs'):
    model = models.get_model('scatter_cnn', 10, norm='none', scale_norm=True)
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 7, 7, 81)))
  with pytest.raises(ValueError, match='model.norm must be one of'):
    models.get_model('scatter_cnn', 10, norm='layer')


@pytest.mark.parametrize('dataset,model', [
    (d, m) for d in ('mnist', 'fashion_mnist', 'cifar10')
    for m in ('linear', 'cnn', 'cnn_tb')])
def test_scatternet_configs(dataset, model):
  """Every ScatterNet config: features, GroupNorm or statistics released
  once under DP, epsilon 3, the paper's clip norm, and a valid config for
  dpjax-train."""
  config = importlib.import_module(f'configs.scatternet_{dataset}').get_config(
      model)
  assert config.data.features == 'scatternet'
  assert config.model.name == f'scatter_{model}'
  assert (config.model.norm, config.normalization.policy) in (
      ('group', 'reject'), ('batch', 'privatized_once'))
  assert config.model.num_groups == 27 and not config.model.affine
  assert (config.privacy.target_epsilon, config.privacy.delta,
          config.privacy.clip_norm) == (3.0, 1e-5, 0.1)
  assert config.privacy.accountant == (
      'pld' if (dataset, model) == ('cifar10', 'cnn_tb') else 'rdp')
  config_validation.validate_config(config)
  with pytest.raises(ValueError, match="model argument.*got 'resnet'"):
    importlib.import_module(f'configs.scatternet_{dataset}').get_config(
        'resnet')
