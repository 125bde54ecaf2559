"""One key schedule for every source of randomness in a run.

Privacy invariant 6: every source of randomness has its own stream, derived
from one schedule by a named, collision-free rule, and the noise is secret.
A stream's key at step ``t`` (and, where a draw is per device, on device
``d``) is::

    root(secret)  = fold_in(wrap(secret_seed), SECRET_DOMAIN)   # never public
    root(public)  = fold_in(wrap(seed), PUBLIC_DOMAIN)          # config.seed
    stream root   = fold_in(root(stream.secret), stream.tag)
    key(stream, t[, d]) = fold_in(fold_in(stream root, t)[, d])

Tags are unique constants of :data:`STREAMS` (checked at import), each level
of the tree takes one ``fold_in``, and nothing else in dpjax makes a key from
an integer: a module gets its stream root from here and derives per-step keys
with :func:`for_step`. Host-side draws (the Poisson sampler, the public
BatchNorm batch) seed NumPy from the bits of their stream's key
(:func:`host_rng`), so they belong to the same tree.

Why two roots. The gradient noise, the sampler (subsampling amplification
assumes the batch is hidden), ModelMix's mixing weights and every other
mechanism-internal draw come from the SECRET root: its seed is drawn from the
OS's entropy (:func:`fresh_secret`) unless a run asks for reproducibility
with an explicit ``noise_seed``, and it is kept in the checkpoint (which is
therefore as secret as a private key) but never written to summary.json,
logs or plots. Anyone holding the released model and a secret seed could
regenerate and subtract the noise. What may be public (parameter
initialization, the public/private split, the public batches, evaluation
subsets) comes from the PUBLIC root, ``config.seed``, and so reproduces
across runs without revealing anything.

References:
  Jin et al., 2022. Are We There Yet? Timing and Floating-Point Attacks on
  Differential Privacy Systems. https://arxiv.org/abs/2112.05307
"""

from __future__ import annotations

import dataclasses
import secrets as secrets_lib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# One fold_in constant per root, so that a run whose noise_seed equals its
# public seed still has two unrelated roots.
PUBLIC_DOMAIN = 0x5EED_0001
SECRET_DOMAIN = 0x5EC2_E7A1
_IMPL = 'threefry2x32'
_MAX_SEED = 2**64


class Stream(NamedTuple):
  """A named source of randomness: its tag and whether it must stay secret."""

  name: str
  tag: int
  secret: bool


INIT = Stream('init', 1, secret=False)
DATA = Stream('data', 2, secret=False)  # public split, train subset
PUBLIC_BATCH = Stream('public_batch', 3, secret=False)
EVAL = Stream('eval', 4, secret=False)
SAMPLER = Stream('sampler', 11, secret=True)
NOISE = Stream('noise', 12, secret=True)
CLIP_COUNT = Stream('clip_count', 13, secret=True)  # adaptive clipping
STATS = Stream('stats', 14, secret=True)  # privatized BatchNorm statistics
MIX = Stream('mix', 15, secret=True)  # ModelMix's alpha
PRUNE = Stream('prune', 16, secret=True)  # pruning masks
AUGMENT = Stream('augment', 17, secret=True)  # augmentation multiplicity
DROPOUT = Stream('dropout', 18, secret=True)  # per-example dropout
CANARY = Stream('canary', 19, secret=True)  # audit canaries
# the one-time release of privatized_once BatchNorm statistics
STATS_ONCE = Stream('stats_once', 20, secret=True)

STREAMS: tuple[Stream, ...] = (
    INIT, DATA, PUBLIC_BATCH, EVAL, SAMPLER, NOISE, CLIP_COUNT, STATS, MIX,
    PRUNE, AUGMENT, DROPOUT, CANARY, STATS_ONCE)

if len({s.tag for s in STREAMS}) != len(STREAMS) or len(
    {s.name for s in STREAMS}) != len(STREAMS):
  raise AssertionError('dpjax.keys: stream tags and names must be unique.')


def fresh_secret() -> int:
  """A 64-bit seed from the OS's entropy (``secrets``), for the secret root.

  On several hosts, process 0's draw is sent to all: every host must sample
  the same batches and add the same noise.
  """
  secret = secrets_lib.randbits(64)
  if jax.process_count() > 1:
    # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils
    words = np.array([secret >> 32, secret & 0xFFFFFFFF], np.uint32)
    words = np.asarray(multihost_utils.broadcast_one_to_all(words))
    secret = (int(words[0]) << 32) | int(words[1])
  return secret


def _check_seed(name: str, seed: int) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or (
      not 0 <= seed < _MAX_SEED):
    raise ValueError(
        f'{name} must be an integer in [0, 2**64), got {seed!r}.')
  return int(seed)


def _wrap(seed: int, domain: int) -> jax.Array:
  # jax.random.key(int) keeps only 32 bits of a seed without x64: build the
  # key from both words so that all 64 bits of the secret count.
  words = np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
  return jax.random.fold_in(jax.random.wrap_key_data(words, impl=_IMPL),
                            domain)


def public_root(seed: int, stream: Stream) -> jax.Array:
  """The root of a PUBLIC ``stream`` from the public seed alone."""
  if stream.secret:
    raise ValueError(f'stream {stream.name!r} is secret; it has no public'
                     ' root.')
  return jax.random.fold_in(_wrap(_check_seed('seed', seed), PUBLIC_DOMAIN),
                            stream.tag)


def for_step(root: jax.Array, step: jax.Array | int) -> jax.Array:
  """The key of draw ``step`` of a stream whose root is ``root``.

  The one rule by which stateful transforms (noise, counts, mixing) derive
  their per-step keys: works under ``jit`` with a traced step.
  """
  return jax.random.fold_in(root, step)


def init_stream(root: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(root, 0)``: a transform state's stream root and draw counter.

  The root is a copy: a training step may donate the state, deleting this
  buffer, and ``init`` must still work afterwards (a second run, a restart).
  """
  return jnp.copy(root), jnp.zeros((), jnp.int32)


def host_rng(key: jax.Array) -> np.random.Generator:
  """A NumPy generator seeded by the bits of ``key`` (host-side draws)."""
  return np.random.default_rng(np.asarray(jax.random.key_data(key)))


@dataclasses.dataclass(frozen=True)
class KeySchedule:
  """A run's randomness: a public seed and a secret one.

  Examples:
    >>> from dpjax import keys
    >>> schedule = keys.KeySchedule(seed=0, secret_seed=1)
    >>> a = schedule.key(keys.NOISE, step=3)
    >>> b = keys.for_step(schedule.root(keys.NOISE), 3)
    >>> bool((jax.random.key_data(a) == jax.random.key_data(b)).all())
    True

  Attributes:
    seed: the public seed (``config.seed``): initialization, data split,
      public batches, evaluation subsets.
    secret_seed: the secret seed of every mechanism-internal draw. Keep it
      as secret as the training data: with it, the noise can be removed.
    secret_given: whether ``secret_seed`` was chosen by the user
      (``privacy.noise_seed``, reproducible) rather than drawn from entropy.
  """

  seed: int
  secret_seed: int = dataclasses.field(repr=False)
  secret_given: bool = True

  def __post_init__(self):
    _check_seed('seed', self.seed)
    _check_seed('secret_seed (privacy.noise_seed)', self.secret_seed)

  @classmethod
  def create(cls, seed: int, noise_seed: int | None = None) -> 'KeySchedule':
    """Public ``seed``; secret from ``noise_seed`` if given, else entropy."""
    if noise_seed is None:
      return cls(seed, fresh_secret(), secret_given=False)
    return cls(seed, noise_seed, secret_given=True)

  def root(self, stream: Stream) -> jax.Array:
    """The root key of ``stream``."""
    if stream not in STREAMS:
      raise ValueError(f'unknown stream {stream!r}; use one of dpjax.keys.'
                       'STREAMS.')
    if not stream.secret:
      return public_root(self.seed, stream)
    return jax.random.fold_in(_wrap(self.secret_seed, SECRET_DOMAIN),
                              stream.tag)

  def key(self, stream: Stream, step: int = 0,
          device: int | None = None) -> jax.Array:
    """The key of ``stream`` at ``step`` (and ``device``, for per-device draws)."""
    key = for_step(self.root(stream), step)
    return key if device is None else jax.random.fold_in(key, device)

  def rng(self, stream: Stream, step: int = 0) -> np.random.Generator:
    """A host-side generator for ``stream`` at ``step``."""
    return host_rng(self.key(stream, step))
