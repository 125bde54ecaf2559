"""ScatterNet: the 2D scattering transform, and the DP models trained on it.

The scattering transform (Mallat 2012, "Group Invariant Scattering"; Bruna &
Mallat 2013, "Invariant Scattering Convolution Networks") is a fixed cascade
of Morlet wavelet filters, complex moduli and a Gaussian low-pass ``phi``:

    order 0:   x * phi
    order 1:   |x * psi[j1, t1]| * phi
    order 2:   ||x * psi[j1, t1]| * psi[j2, t2]| * phi          (j2 > j1)

each subsampled by ``2**J``. With J scales and L angles that is
``1 + J L + L**2 J (J - 1) / 2`` channels per input channel: 81 at J = 2,
L = 8, at 1/4 of the resolution. Nothing in it is learned, and it reads one
image at a time, so features computed once before training are a fixed
per-example map: DP-SGD on a model over them has the same guarantee as on the
pixels (nothing about the private set leaves through the features).

Tramer & Boneh 2021 ("Differentially Private Learning Needs Better Features
(or Much More Data)", ICLR) showed that DP-SGD on these features, normalized
(GroupNorm, or privately estimated statistics), beats end-to-end CNNs at
epsilon = 3: :class:`ScatterLinear` and :class:`TramerBonehCNN` are their
linear model and small CNN; :class:`ScatterCNN` is dpjax's variant of the CNN
(a norm after each convolution and a residual connection around the second,
so that the normalization comparison and ScaleNorm have their places).

Filters follow the conventions of Kymatio (Andreux et al. 2020, "Kymatio:
Scattering Transforms in Python", JMLR), so features agree with its
``Scattering2D`` (tests/test_scatternet.py): Morlet wavelets of width
``0.8 * 2**j``, centre frequency ``3 pi / 4 / 2**j``, slant ``4 / L``, angles
``(L // 2 - 1 - l) pi / L`` (rows first), sampled on a grid periodized over
5 x 5 tiles; a Gaussian low-pass of width ``0.8 * 2**(J - 1)``; inputs padded
by reflection to ``((n + 2**J) // 2**J + 1) 2**J`` pixels, one coefficient
cropped at each border at the end. Wavelets at a coarser resolution are their
spectra cropped to the low band; subsampling by k averages the k x k aliases
of a spectrum (the spectrum of ``x[::k, ::k]``).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpjax import resnets

Activation = Callable[[jax.Array], jax.Array]


def num_channels(J: int = 2, L: int = 8, order: int = 2) -> int:
  """Scattering channels per input channel.

  Examples:
    >>> num_channels(2, 8, 2), num_channels(2, 8, 1), num_channels(3, 8, 2)
    (81, 17, 217)
  """
  _check_settings(J, L, order)
  channels = 1 + J * L
  if order == 2:
    channels += L * L * J * (J - 1) // 2
  return channels


def padded_size(n: int, J: int) -> int:
  """The reflection-padded length of a side of n pixels (a multiple of 2**J).

  Examples:
    >>> padded_size(32, 2), padded_size(28, 2), padded_size(8, 2)
    (40, 36, 16)
  """
  return ((n + 2**J) // 2**J + 1) * 2**J


def output_size(n: int, J: int) -> int:
  """Side of the feature maps of a side of n pixels.

  Examples:
    >>> output_size(32, 2), output_size(28, 2), output_size(8, 2)
    (8, 7, 2)
  """
  return padded_size(n, J) // 2**J - 2


def _check_settings(J: int, L: int, order: int) -> None:
  for name, value in (('J', J), ('L', L)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'scattering {name} must be an integer >= 1, got'
                       f' {value!r}.')
  if order not in (1, 2):
    raise ValueError(f'scattering order must be 1 or 2, got {order!r}.')


# ---------------------------------------------------------------------------
# The filter bank (NumPy, built once per padded shape).


def gabor_2d(M: int, N: int, sigma: float, theta: float, xi: float,
             slant: float = 1.0) -> np.ndarray:
  """A Gabor filter on an M x N grid, periodized over 5 x 5 tiles.

  ``g(u) = exp(-u^T A u / (2 sigma^2) + i xi (u_0 cos theta + u_1 sin
  theta)) slant / (2 pi sigma^2)`` with A = R diag(1, slant^2) R^T, R the
  rotation by theta; the origin is pixel (0, 0).

  Examples:
    >>> g = gabor_2d(16, 16, sigma=1.0, theta=0.0, xi=0.0)
    >>> round(float(g.real.sum()), 4)   # a normalized Gaussian
    1.0
  """
  cos, sin = math.cos(theta), math.sin(theta)
  rotation = np.array([[cos, -sin], [sin, cos]])
  a = rotation @ np.diag([1.0, slant * slant]) @ rotation.T / (2 * sigma**2)
  tiles = np.arange(-2, 3)
  u = (np.arange(M)[None, :] + M * tiles[:, None]).reshape(-1, 1)
  v = (np.arange(N)[None, :] + N * tiles[:, None]).reshape(1, -1)
  arg = -(a[0, 0] * u * u + 2 * a[0, 1] * u * v + a[1, 1] * v * v)
  arg = arg + 1j * xi * (u * cos + v * sin)
  g = np.exp(arg).reshape(5, M, 5, N).sum(axis=(0, 2))
  return g * slant / (2 * math.pi * sigma**2)


def morlet_2d(M: int, N: int, sigma: float, theta: float, xi: float,
              slant: float = 0.5) -> np.ndarray:
  """A Morlet wavelet: a Gabor filter minus its envelope times the constant
  that makes its mean exactly zero.

  Examples:
    >>> psi = morlet_2d(16, 16, sigma=0.8, theta=0.0, xi=3 * math.pi / 4)
    >>> abs(complex(psi.sum())) < 1e-12
    True
  """
  wave = gabor_2d(M, N, sigma, theta, xi, slant)
  envelope = gabor_2d(M, N, sigma, theta, 0.0, slant)
  return wave - wave.sum() / envelope.sum() * envelope


def crop_spectrum(spectrum: np.ndarray, resolution: int) -> np.ndarray:
  """The low band of a spectrum, as the spectrum at 1/2**resolution size.

  Examples:
    >>> crop_spectrum(np.arange(16.0).reshape(4, 4), 1).tolist()
    [[0.0, 3.0], [12.0, 15.0]]
  """
  M, N = spectrum.shape[-2:]
  m, n = M >> resolution, N >> resolution
  rows = np.r_[0:m // 2, M - m // 2:M]
  cols = np.r_[0:n // 2, N - n // 2:N]
  return spectrum[..., rows[:, None], cols[None, :]]


class FilterBank(NamedTuple):
  """Filter spectra (real float32) on the padded grid and coarser ones.

  ``phi[r]``: the low-pass at resolution r = 0..J-1, [M / 2**r, N / 2**r].
  ``psi[j][r]``: the L wavelets of scale j at resolution r = 0..max(j-1, 0),
  [L, M / 2**r, N / 2**r].
  """

  phi: tuple[np.ndarray, ...]
  psi: tuple[tuple[np.ndarray, ...], ...]


@functools.lru_cache(maxsize=32)
def filter_bank(M: int, N: int, J: int = 2, L: int = 8) -> FilterBank:
  """The scattering filters for an M x N padded grid (see the module doc).

  Examples:
    >>> bank = filter_bank(40, 40, J=2, L=8)
    >>> [p.shape for p in bank.phi], [[p.shape for p in s] for s in bank.psi]
    ([(40, 40), (20, 20)], [[(8, 40, 40)], [(8, 40, 40)]])
  """
  _check_settings(J, L, 1)
  if M % 2**J or N % 2**J:
    raise ValueError(f'the padded grid {M}x{N} must be a multiple of 2**J ='
                     f' {2**J}; pad with padded_size().')

  def spectrum(f):
    # The filters satisfy f(-u) = conj(f(u)): their spectra are real.
    return np.fft.fft2(f).real

  psi = []
  for j in range(J):
    angles = [(L // 2 - 1 - l) * math.pi / L for l in range(L)]
    full = np.stack([
        spectrum(morlet_2d(M, N, 0.8 * 2**j, theta, 3 * math.pi / 4 / 2**j,
                           slant=4.0 / L)) for theta in angles])
    psi.append(tuple(crop_spectrum(full, r).astype(np.float32)
                     for r in range(max(j, 1))))
  low = spectrum(gabor_2d(M, N, 0.8 * 2**(J - 1), 0.0, 0.0))
  phi = tuple(crop_spectrum(low, r).astype(np.float32) for r in range(J))
  return FilterBank(phi=phi, psi=tuple(psi))


# ---------------------------------------------------------------------------
# The transform (JAX: jit- and vmap-able).


def _subsample(spectrum: jax.Array, k: int) -> jax.Array:
  """The spectrum of ``x[::k, ::k]`` from the spectrum of x (last two axes)."""
  if k == 1:
    return spectrum
  *lead, M, N = spectrum.shape
  return spectrum.reshape(*lead, k, M // k, k, N // k).mean(axis=(-4, -2))


def _modulus(spectrum: jax.Array, k: int) -> jax.Array:
  """Spectrum of ``|ifft(spectrum)[::k, ::k]|``."""
  return jnp.fft.fft2(jnp.abs(jnp.fft.ifft2(_subsample(spectrum, k))))


def _lowpass(spectrum: jax.Array, phi: np.ndarray, k: int) -> jax.Array:
  """``(u * phi)[::k, ::k]`` in space, u given by its spectrum."""
  return jnp.fft.ifft2(_subsample(spectrum * phi, k)).real


def _scatter_planes(planes: jax.Array, bank: FilterBank, J: int, L: int,
                    order: int) -> jax.Array:
  """[B, M, N] padded planes -> [B, K, M / 2**J, N / 2**J] coefficients."""
  b = planes.shape[0]
  x = jnp.fft.fft2(planes.astype(jnp.complex64))
  out = [_lowpass(x, bank.phi[0], 2**J)[:, None]]
  second = []
  for j1 in range(J):
    u1 = _modulus(x[:, None] * bank.psi[j1][0], 2**j1)         # [B, L, ...]
    out.append(_lowpass(u1, bank.phi[j1], 2**(J - j1)))
    if order == 2 and j1 < J - 1:
      blocks = [
          _lowpass(_modulus(u1[:, :, None] * bank.psi[j2][j1], 2**(j2 - j1)),
                   bank.phi[j2], 2**(J - j2))               # [B, L, L, ...]
          for j2 in range(j1 + 1, J)]
      # Order: t1, then j2, then t2 (the order of Kymatio's loops).
      s2 = jnp.concatenate(blocks, axis=2)
      second.append(s2.reshape((b, -1) + s2.shape[-2:]))
  return jnp.concatenate(out + second, axis=1)


def scattering(images: jax.Array, J: int = 2, L: int = 8,
               order: int = 2) -> jax.Array:
  """The scattering transform of channels-last images.

  Each input channel is transformed on its own; its K = ``num_channels(J,
  L, order)`` coefficients are contiguous in the output (channel c's are
  ``c * K ... c * K + K - 1``: order 0, order 1 by scale then angle, order 2
  by (j1, t1, j2, t2)).

  Examples:
    >>> x = jnp.ones((2, 28, 28, 1))
    >>> s = scattering(x)
    >>> s.shape
    (2, 7, 7, 81)
    >>> round(float(s[0, 3, 3, 0]), 4), float(jnp.abs(s[..., 1:]).max()) < 1e-5
    (1.0, True)

  Args:
    images: [..., H, W, C] real images (any leading axes, or none).
    J: number of scales (the output is 2**J times smaller per side).
    L: number of angles.
    order: 1 or 2.

  Returns:
    [..., H', W', C * K] float32 coefficients, H' = ``output_size(H, J)``.
  """
  _check_settings(J, L, order)
  images = jnp.asarray(images)
  if images.ndim < 3:
    raise ValueError(
        f'scattering expects images [..., H, W, C], got shape {images.shape}.')
  *lead, h, w, c = images.shape
  planes = jnp.moveaxis(images, -1, -3).reshape((-1, h, w))
  mh, mw = padded_size(h, J), padded_size(w, J)
  top, left = (mh - h) // 2, (mw - w) // 2
  if max(top, mh - h - top) >= h or max(left, mw - w - left) >= w:
    raise ValueError(
        f'images of {h}x{w} pixels are too small for J = {J} (the reflection'
        f' padding to {mh}x{mw} needs more than {2**J} pixels per side).')
  planes = jnp.pad(planes.astype(jnp.float32),
                   ((0, 0), (top, mh - h - top), (left, mw - w - left)),
                   mode='reflect')
  coeffs = _scatter_planes(planes, filter_bank(mh, mw, J, L), J, L, order)
  coeffs = coeffs[..., 1:-1, 1:-1]                     # [B * C, K, h', w']
  k, oh, ow = coeffs.shape[-3:]
  coeffs = coeffs.reshape(tuple(lead) + (c, k, oh, ow))
  coeffs = jnp.moveaxis(coeffs.reshape(tuple(lead) + (c * k, oh, ow)), -3, -1)
  return coeffs


# ---------------------------------------------------------------------------
# Models over scattering features (inputs [..., H', W', K * C]).


def divisor_groups(features: int, num_groups: int) -> int:
  """The largest group count <= ``num_groups`` that divides ``features``.

  Examples:
    >>> divisor_groups(243, 27), divisor_groups(64, 27), divisor_groups(81, 27)
    (27, 16, 27)
  """
  return max(g for g in range(1, min(num_groups, features) + 1)
             if features % g == 0)


def _norm(kind: str, features: int, num_groups: int, train: bool,
          affine: bool, name: str) -> Callable[[jax.Array], jax.Array]:
  return resnets.normalization(kind, features,
                               divisor_groups(features, num_groups), train,
                               affine, name)


def _normalized_features(x: jax.Array, kind: str, num_groups: int,
                         train: bool, affine: bool) -> jax.Array:
  """The features in float32 through the 'feature_norm' layer."""
  x = jnp.asarray(x, jnp.float32)
  return _norm(kind, x.shape[-1], num_groups, train, affine,
               'feature_norm')(x)


class ScatterLinear(nn.Module):
  """Normalized scattering features, then one Dense layer (logistic
  regression): Tramer & Boneh 2021's ScatterNet+linear.

  ``norm``: the features' normalization: 'group' (GroupNorm with
  ``num_groups`` groups of contiguous channels; theirs: 27, no affine),
  'batch' (BatchNorm, statistics under a :mod:`dpjax.normalization` policy)
  or 'none'.
  """

  num_classes: int = 10
  norm: str = 'group'
  num_groups: int = 27
  affine: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = _normalized_features(x, self.norm, self.num_groups, train,
                             self.affine)
    return nn.Dense(self.num_classes, name='head')(
        x.reshape(x.shape[:-3] + (-1,)))


class ScatterCNN(nn.Module):
  """Tramer & Boneh 2021's ScatterNet+CNN, with a residual second stage.

  ``norm(features) - conv(w) - norm - act - max-pool/2 - conv(w) - norm -
  (+ shortcut) [- ScaleNorm] - act - Dense``: 3x3 convolutions, ``w = 64 *
  width`` channels (theirs on CIFAR-10: 64, 'M', 64, tanh, Dense, with only
  the features normalized). The same ``norm`` follows each convolution, so
  the normalization comparison changes every layer; GroupNorm groups are
  ``num_groups`` on the features and the largest divisor of w up to it on
  the convolutions. ScaleNorm (Klause et al. 2022) normalizes the sum of the
  residual connection once more, as in :mod:`dpjax.resnets`.
  """

  num_classes: int = 10
  norm: str = 'group'
  num_groups: int = 27
  scale_norm: bool = False
  affine: bool = False
  width: float = 1.0
  activation: Activation = nn.tanh

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.scale_norm and self.norm == 'none':
      raise ValueError("model.scale_norm needs model.norm 'group' or 'batch'.")
    f = resnets.scaled_width(64, self.width)

    def norm(features, name):
      return _norm(self.norm, features, self.num_groups, train, self.affine,
                   name)

    bias = self.norm == 'none'
    x = _normalized_features(x, self.norm, self.num_groups, train,
                             self.affine)
    x = nn.Conv(f, (3, 3), padding=1, use_bias=bias, name='conv1')(x)
    x = self.activation(norm(f, 'norm1')(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
    y = nn.Conv(f, (3, 3), padding=1, use_bias=bias, name='conv2')(x)
    y = norm(f, 'norm2')(y) + x
    if self.scale_norm:
      y = norm(f, 'scale_norm')(y)
    x = self.activation(y)
    return nn.Dense(self.num_classes, name='head')(
        x.reshape(x.shape[:-3] + (-1,)))


class TramerBonehCNN(nn.Module):
  """Tramer & Boneh 2021's ScatterNet+CNN as they built it, per dataset.

  Only the features are normalized, then 3x3 convolutions with biases and
  tanh (their ``CIFAR10_CNN`` and ``MNIST_CNN`` for scattering inputs):

  - CIFAR-10 features (8 x 8 x 243): ``conv(64) - max-pool/2 - conv(64) -
    Dense(classes)``;
  - MNIST-sized features (7 x 7 x 81): ``conv(16, stride 2) - conv(32) -
    Dense(32) - tanh - Dense(classes)``.

  :class:`ScatterCNN` is dpjax's variant, which normalizes after every
  convolution for the normalization comparison.
  """

  num_classes: int = 10
  norm: str = 'group'
  num_groups: int = 27
  affine: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = _normalized_features(x, self.norm, self.num_groups, train,
                             self.affine)
    if x.shape[-3] >= 8:  # CIFAR-10's 32 x 32 images
      x = jnp.tanh(nn.Conv(64, (3, 3), padding=1, name='conv1')(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
      x = jnp.tanh(nn.Conv(64, (3, 3), padding=1, name='conv2')(x))
      return nn.Dense(self.num_classes, name='head')(
          x.reshape(x.shape[:-3] + (-1,)))
    x = jnp.tanh(nn.Conv(16, (3, 3), strides=2, padding=1, name='conv1')(x))
    x = jnp.tanh(nn.Conv(32, (3, 3), padding=1, name='conv2')(x))
    x = jnp.tanh(nn.Dense(32, name='hidden')(x.reshape(x.shape[:-3] + (-1,))))
    return nn.Dense(self.num_classes, name='head')(x)


# name -> (constructor, takes width / scale_norm / activation)
MODELS: dict[str, tuple[type[nn.Module], bool]] = {
    'scatter_linear': (ScatterLinear, False),
    'scatter_cnn': (ScatterCNN, True),
    'scatter_cnn_tb': (TramerBonehCNN, False),
}
