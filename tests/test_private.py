"""Tests for dpjax/private.py: an existing loop made private in a few lines."""

import difflib
import os
import re

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from dpjax import keys
from dpjax import private as private_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDE = os.path.join(ROOT, 'docs', 'guide', 'make_private.md')
README = os.path.join(ROOT, 'README.md')


def _read(path):
  with open(path) as f:
    return f.read()


def _blocks(text, lang):
  return re.findall(rf'```{lang}\n(.*?)```', text, re.S)


def _diff(before, after):
  """The removed and added lines of ``before`` -> ``after``, as '-'/'+' lines."""
  return [l for l in difflib.unified_diff(
      before.splitlines(), after.splitlines(), n=0, lineterm='')
          if l[:1] in '+-' and not l.startswith(('+++', '---'))]


def _count(diff):
  return (sum(l.startswith('-') for l in diff),
          sum(l.startswith('+') for l in diff))


# ---------------------------------------------------------------------------
# The guide's Linen loop, converted.


def test_the_linen_loop_changes_at_most_five_lines():
  guide = _read(GUIDE)
  plain, private = _blocks(guide, 'python')[:2]
  assert 35 <= len(plain.strip().splitlines()) <= 55
  diff = _diff(plain, private)
  removed, added = _count(diff)
  assert added <= 5 and removed <= 5, diff
  assert _blocks(guide, 'diff')[0].strip() == '\n'.join(diff)


def test_the_readme_shows_the_guides_diff():
  readme = _read(README)
  section = readme.split('## Make an existing loop private', 1)[1]
  assert _blocks(section, 'diff')[0] == _blocks(_read(GUIDE), 'diff')[0]
  assert 'docs/guide/make_private.md' in section


@pytest.fixture(scope='module')
def linen_run():
  namespace = {}
  exec(compile(_blocks(_read(GUIDE), 'python')[1], GUIDE, 'exec'),  # pylint: disable=exec-used
       namespace)
  return namespace


def test_the_converted_loop_tracks_epsilon_itself(linen_run):
  private = linen_run['private']
  reference = dpjax.make_plan(
      dpjax.PrivacyConfig(clip_norm=1.0, target_epsilon=3.0, delta=1e-5,
                          expected_batch_size=64, epochs=3),
      dataset_size=1500)
  assert private.batches.next_step == reference.num_steps
  assert private.epsilon() == pytest.approx(reference.epsilon(), rel=1e-9)
  assert private.epsilon() <= 3.0 + 1e-6
  assert not private.plan.keys.secret_given  # the noise came from entropy
  accuracy = (linen_run['model'].apply(
      {'params': linen_run['params']}, linen_run['test']['image']).argmax(-1)
              == linen_run['test']['label']).mean()
  assert accuracy > 0.5  # it learned (chance is 0.1)


# ---------------------------------------------------------------------------
# The update against the explicit API.


class DropoutMLP(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.tanh(nn.Dense(8)(x))
    x = nn.Dropout(0.3, deterministic=not train)(x)
    return nn.Dense(3)(x)


MODEL = DropoutMLP()
N = 200
DATA = {'x': np.asarray(jax.random.normal(jax.random.key(0), (N, 4))),
        'y': np.arange(N, dtype=np.int32) % 3}
PARAMS = MODEL.init(jax.random.key(1), DATA['x'][:1])['params']


def batch_loss(params, batch, key):
  logits = MODEL.apply({'params': params}, batch['x'], train=True,
                       rngs={'dropout': key})
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['y']).mean()


def example_loss(params, example, key):  # the explicit API's form
  logits = MODEL.apply({'params': params}, example['x'][None], train=True,
                       rngs={'dropout': key})[0]
  return optax.softmax_cross_entropy_with_integer_labels(logits, example['y'])


# One padded shape (64 rows), so each pipeline compiles once.
SETTINGS = dict(expected_batch_size=16, steps=3, clip_norm=0.5, delta=1e-4)
PAD = 64


def _explicit(config, noise_seed, steps):
  """The same run by hand: make_plan, clipped_grad, plan.noise(), optax."""
  plan = dpjax.make_plan(config, N, pad_to_multiple_of=PAD,
                         keys=dpjax.KeySchedule.create(
                             seed=0, noise_seed=noise_seed))

  def loss(params, indexed, inputs):
    key = jax.random.fold_in(inputs.dropout_key, indexed.index)
    return example_loss(params, indexed.examples, key)

  grad_fn = jax.jit(dpjax.clipped_grad(loss, plan.clipping))
  tx = optax.chain(optax.with_extra_args_support(plan.noise()),
                   optax.adam(0.05))
  params, state = PARAMS, tx.init(PARAMS)
  indexed = dpjax.with_indices(DATA)
  for step in range(steps):
    batch = plan.sampler.sample(step).take(indexed)
    inputs = dpjax.StepInputs(dropout_key=plan.keys.key(keys.DROPOUT, step))
    out = grad_fn(params, batch, args=(inputs,))
    updates, state = tx.update(out.grad_sum, state, params,
                               clip_state=out.clip_state)
    params = optax.apply_updates(params, updates)
  return params


CLIPPINGS = {
    'flat': dpjax.ClippingConfig(),
    'per_layer_noise': dpjax.ClippingConfig(
        mode='per_layer', layers='size', layer_noise='per_layer'),
    'automatic': dpjax.ClippingConfig(mode='automatic'),
}


@pytest.mark.parametrize('name', sorted(CLIPPINGS))
def test_the_update_matches_the_explicit_api(name):
  tx = optax.adam(0.05)
  private = dpjax.make_private(
      batch_loss, tx, DATA, noise_multiplier=1.3, noise_seed=7,
      loss_takes_key=True, clipping=CLIPPINGS[name], grad_route='vmap',
      pad_to_multiple_of=PAD, **SETTINGS)

  @jax.jit
  def train_step(params, opt_state, batch):  # the user's own step
    _, grads = private.value_and_grad(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = PARAMS, tx.init(PARAMS)
  for batch in private.batches:
    params, opt_state = train_step(params, opt_state, batch)
  config = dpjax.PrivacyConfig(noise_multiplier=1.3,
                               clipping=CLIPPINGS[name], **SETTINGS)
  expected = _explicit(config, noise_seed=7, steps=3)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_each_batch_carries_the_plans_noise_state_at_its_step():
  # value_and_grad runs the plan's own noise transform from this state: the
  # noise formula lives in one place (dpjax/noise.py).
  private = _private(noise_seed=9)
  state = private.plan.noise().init(jnp.zeros(4))
  for step, batch in zip(range(3), private.batches):
    assert int(batch.noise.count) == step == int(batch.step)
    np.testing.assert_array_equal(jax.random.key_data(batch.noise.key),
                                  jax.random.key_data(state.key))


def test_a_second_gradient_of_the_same_batch_is_refused():
  # Its noise would be the first one's: the difference is noise-free.
  private = _private()
  batch = next(iter(private.batches))
  value_and_grad = jax.jit(private.value_and_grad)
  jax.block_until_ready(value_and_grad(jnp.zeros(4), batch))
  with pytest.raises(Exception, match='reuses its noise'):
    jax.block_until_ready(value_and_grad(jnp.ones(4), batch))
  jax.block_until_ready(value_and_grad(jnp.ones(4),
                                       next(iter(private.batches))))


def test_every_grad_route_gives_the_same_private_gradient():
  grads = {}
  for route in ('vmap', 'bookkeeping', 'ghost'):
    private = dpjax.make_private(
        batch_loss, optax.sgd(0.1), DATA, noise_multiplier=1.3, noise_seed=4,
        loss_takes_key=True, grad_route=route, pad_to_multiple_of=PAD,
        microbatch_size=None if route == 'vmap' else 24, **SETTINGS)
    batch = next(iter(private.batches))
    grads[route] = jax.jit(private.value_and_grad)(PARAMS, batch)[1]
  for route in ('bookkeeping', 'ghost'):
    for a, b in zip(jax.tree.leaves(grads[route]),
                    jax.tree.leaves(grads['vmap'])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_private_step_equals_the_users_step_and_secure_noise_runs():
  tx = optax.sgd(0.1)
  make = lambda: dpjax.make_private(  # pylint: disable=g-long-lambda
      batch_loss, tx, DATA, noise_multiplier=1.0, noise_seed=3,
      loss_takes_key=True, secure_noise=True, pad_to_multiple_of=PAD,
      **SETTINGS)
  a, b = make(), make()
  value_and_grad = jax.jit(b.value_and_grad)
  params_a = params_b = PARAMS
  state_a = state_b = tx.init(PARAMS)
  for batch_a, batch_b in zip(a.batches, b.batches):
    params_a, state_a, _ = a.step(params_a, state_a, batch_a)
    _, grads = value_and_grad(params_b, batch_b)
    updates, state_b = tx.update(grads, state_b, params_b)
    params_b = optax.apply_updates(params_b, updates)
  for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_divides_by_the_expected_batch_size_not_the_realized_one():
  def loss(w, batch):
    return jnp.mean(batch['x'] @ w)

  private = dpjax.make_private(
      loss, optax.sgd(1.0), DATA, noise_multiplier=0.0, clip_norm=1e6,
      expected_batch_size=16, steps=8, delta=1e-4)
  # The sampling key is secret: take the first batch whose realized size is
  # not the expected one (all 8 of size 16: probability about 1e-8).
  for batch in private.batches:
    rows = batch.batch.examples.examples['x'][batch.batch.mask]
    if len(rows) != 16:
      break
  assert len(rows) != 16
  _, grads = private.value_and_grad(jnp.zeros(4), batch)
  np.testing.assert_allclose(grads, rows.sum(0) / 16, rtol=1e-5)


# ---------------------------------------------------------------------------
# Batches, ledger, keys.


def _private(**kwargs):
  settings = dict(noise_multiplier=1.0, expected_batch_size=20, epochs=2,
                  delta=1e-4)
  settings.update(kwargs)
  return dpjax.make_private(
      lambda w, b: jnp.mean(b['x'] @ w), optax.sgd(0.1), DATA, **settings)


def test_each_pass_is_an_epoch_and_the_ledger_records_each_batch():
  private = _private()
  plan = private.plan
  assert plan.num_steps == 20
  lengths = []
  for _ in range(2):
    lengths.append(len(private.batches))
    for i, batch in enumerate(private.batches):
      assert int(batch.step) == private.batches.next_step - 1
      assert private.epsilon() == pytest.approx(plan.epsilon(int(batch.step)
                                                             + 1))
      assert batch.batch.mask.sum() == plan.sampler.sample(
          int(batch.step)).size
    assert i + 1 == lengths[-1]
  assert lengths == [10, 10]
  assert private.epsilon() == pytest.approx(plan.epsilon())
  with pytest.raises(RuntimeError, match=r'all 20 steps of the plan'):
    iter(private.batches)


def test_a_pass_cut_short_continues_where_it_stopped():
  private = _private(epochs=1)
  for batch in private.batches:
    if int(batch.step) == 3:
      break
  assert [int(b.step) for b in private.batches] == list(range(4, 10))


def test_noise_is_secret_by_default_and_reproducible_with_noise_seed():
  a, b = _private(), _private()
  assert not a.plan.keys.secret_given
  assert not np.array_equal(a.plan.sampler.sample(0).indices,
                            b.plan.sampler.sample(0).indices)
  c, d = _private(noise_seed=5), _private(noise_seed=5)
  batch_c, batch_d = next(iter(c.batches)), next(iter(d.batches))
  np.testing.assert_array_equal(batch_c.batch.mask, batch_d.batch.mask)
  np.testing.assert_array_equal(jax.random.key_data(batch_c.noise.key),
                                jax.random.key_data(batch_d.noise.key))
  assert 'noise' not in repr(batch_c) and 'examples' not in repr(batch_c)


def test_secret_keys_are_arguments_of_the_compiled_step():
  private = _private(noise_seed=11)
  batch = next(iter(private.batches))
  hlo = jax.jit(private.value_and_grad).lower(jnp.zeros(4), batch).as_text()
  schedule = private.plan.keys
  for stream in (keys.NOISE, keys.DROPOUT):
    for key in (schedule.root(stream), schedule.key(stream, 0)):
      for word in np.asarray(jax.random.key_data(key)).tolist():
        assert str(word) not in hlo


def test_an_iterable_of_batches_is_read_as_the_dataset():
  chunks = [jax.tree.map(lambda x: x[i:i + 50], DATA) for i in range(0, N, 50)]
  arrays = private_lib.as_arrays(iter(chunks))
  for a, b in zip(jax.tree.leaves(arrays), jax.tree.leaves(DATA)):
    np.testing.assert_array_equal(a, b)
  private = _private(noise_seed=1)
  from_chunks = dpjax.make_private(
      lambda w, b: jnp.mean(b['x'] @ w), optax.sgd(0.1), chunks,
      noise_multiplier=1.0, expected_batch_size=20, epochs=2, delta=1e-4,
      noise_seed=1)
  assert from_chunks.plan.dataset_size == N
  np.testing.assert_array_equal(
      next(iter(private.batches)).batch.examples.examples['x'],
      next(iter(from_chunks.batches)).batch.examples.examples['x'])


# ---------------------------------------------------------------------------
# Refusals: one line naming the value and the fix.


@pytest.mark.parametrize('kwargs,match', [
    (dict(target_epsilon=3.0), r'exactly one of target_epsilon.*'
     r'noise_multiplier=1.0'),
    (dict(noise_multiplier=None), r'exactly one of target_epsilon'),
    (dict(steps=5), r'exactly one of epochs and steps'),
    (dict(clipping=dpjax.ClippingConfig(mode='adaptive')),
     r"mode='adaptive'.*dpjax-train or the explicit API"),
    (dict(clipping=dpjax.ClippingConfig(mode='batch')), r"mode='batch'"),
    (dict(clipping=dpjax.ClippingConfig(mode='per_layer', layers='alc')),
     r"layers='alc'"),
    (dict(grad_route='fast'), r"grad_route must be one of .*'fast'"),
    (dict(delta=0.1), r'delta=0.1 is >= 1/N'),
])
def test_bad_settings_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match) as info:
    _private(**kwargs)
  assert '\n' not in str(info.value)


def test_a_batch_of_the_users_own_is_refused():
  private = _private()
  with pytest.raises(TypeError, match=r'got a dict: iterate `for batch in'):
    private.value_and_grad(jnp.zeros(4), DATA)


def test_loss_arguments_must_match_loss_takes_key():
  with pytest.raises(ValueError, match='pass loss_takes_key=True'):
    dpjax.make_private(batch_loss, optax.sgd(0.1), DATA, noise_multiplier=1.0,
                       **SETTINGS)
  with pytest.raises(ValueError, match='drop loss_takes_key'):
    dpjax.make_private(lambda p, b: 0.0, optax.sgd(0.1), DATA,
                       noise_multiplier=1.0, loss_takes_key=True, **SETTINGS)


def test_bad_data_is_refused():
  with pytest.raises(ValueError, match='same leading'):
    private_lib.as_arrays({'x': np.zeros((3, 2)), 'y': np.zeros(4)})
  with pytest.raises(ValueError, match='empty iterable'):
    private_lib.as_arrays(iter([]))
  with pytest.raises(ValueError, match='batch 1 of data'):
    private_lib.as_arrays([{'x': np.zeros(2)}, {'z': np.zeros(2)}])
  with pytest.raises(TypeError, match='got int'):
    private_lib.as_arrays(3)


# ---------------------------------------------------------------------------
# Flax NNX.

NNX_PLAIN = '''\
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from sklearn.datasets import load_digits

digits = load_digits()
images = (digits.images[..., None] / 16.0).astype(np.float32)
labels = digits.target.astype(np.int32)
train = {'image': images[:1500], 'label': labels[:1500]}
test = {'image': images[1500:], 'label': labels[1500:]}


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 64, rngs=rngs)
    self.out = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.tanh(self.hidden(x.reshape((x.shape[0], -1)))))


model = MLP(nnx.Rngs(0))
tx = optax.adam(1e-2)
optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)


def loss_fn(model, batch):
  logits = model(batch['image'])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()


@nnx.jit
def train_step(model, optimizer, batch):
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  return loss


def batches(data, batch_size, rng):
  order = rng.permutation(len(data['label']))
  for i in range(0, len(order) - batch_size + 1, batch_size):
    yield {k: v[order[i:i + batch_size]] for k, v in data.items()}


rng = np.random.default_rng(0)
for epoch in range(3):
  for batch in batches(train, 64, rng):
    loss = train_step(model, optimizer, batch)
  accuracy = (model(test['image']).argmax(-1) == test['label']).mean()
  print(f'epoch {epoch}: loss {loss:.3f}, test accuracy {accuracy:.3f}')
'''

NNX_CHANGES = [
    ('import jax, jax.numpy as jnp, numpy as np, optax\n',
     'import jax, jax.numpy as jnp, numpy as np, optax, dpjax\n'),
    ('  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)',
     '  loss, grads = private.value_and_grad(model, batch)'),
    ('rng = np.random.default_rng(0)\n',
     'rng = np.random.default_rng(0)\nprivate = dpjax.make_private(loss_fn, tx,'
     ' train, target_epsilon=3.0, expected_batch_size=64, epochs=3)\n'),
    ('  for batch in batches(train, 64, rng):',
     '  for batch in private.batches:'),
    ("test accuracy {accuracy:.3f}')",
     "test accuracy {accuracy:.3f}, epsilon {private.epsilon():.2f}')"),
]


def _nnx_private():
  source = NNX_PLAIN
  for old, new in NNX_CHANGES:
    assert source.count(old) == 1
    source = source.replace(old, new)
  return source


def test_the_nnx_loop_changes_at_most_five_lines_as_the_guide_says():
  diff = _diff(NNX_PLAIN, _nnx_private())
  removed, added = _count(diff)
  assert added <= 5 and removed <= 5, diff
  assert _blocks(_read(GUIDE), 'diff')[1].strip() == '\n'.join(diff)


def test_the_converted_nnx_loop_runs_and_tracks_epsilon():
  source = _nnx_private().replace('range(3)', 'range(1)').replace(
      'epochs=3', 'epochs=1')
  namespace = {}
  exec(compile(source, 'nnx_loop', 'exec'), namespace)  # pylint: disable=exec-used
  private = namespace['private']
  assert private.batches.next_step == private.plan.num_steps
  reference = dpjax.make_plan(
      dpjax.PrivacyConfig(target_epsilon=3.0, expected_batch_size=64,
                          epochs=1), dataset_size=1500)
  assert private.epsilon() == pytest.approx(reference.epsilon(), rel=1e-9)


class Tiny(nnx.Module):

  def __init__(self, rngs: nnx.Rngs, batch_norm: bool = False):
    self.dense = nnx.Linear(4, 3, rngs=rngs)
    self.norm = nnx.BatchNorm(3, rngs=rngs) if batch_norm else None

  def __call__(self, x):
    x = self.dense(x)
    return x if self.norm is None else self.norm(x)


def _nnx_loss(model, batch):
  return optax.softmax_cross_entropy_with_integer_labels(
      model(batch['x']), batch['y']).mean()


def test_the_nnx_gradient_is_the_param_states_private_gradient():
  model = Tiny(nnx.Rngs(0))
  private = dpjax.make_private(_nnx_loss, optax.sgd(0.1), DATA,
                               noise_multiplier=0.8, noise_seed=2,
                               expected_batch_size=16, steps=1, delta=1e-4)
  batch = next(iter(private.batches))
  _, grads = nnx.jit(private.value_and_grad)(model, batch)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p, indexed, inputs):
    del inputs
    one = jax.tree.map(lambda x: x[None], indexed.examples)
    return _nnx_loss(nnx.merge(graphdef, p, rest), one)

  out = dpjax.clipped_grad(loss, private.plan.clipping)(
      params, batch.batch, args=(dpjax.StepInputs(),))
  noise = private.plan.noise()
  expected, _ = noise.update(out.grad_sum, noise.init(params))
  assert jax.tree.structure(grads) == jax.tree.structure(
      nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_an_nnx_model_with_batch_stats_is_refused():
  private = _private()
  with pytest.raises(ValueError, match=r'nnx.BatchStat.*GroupNorm'):
    private.value_and_grad(Tiny(nnx.Rngs(0), batch_norm=True),
                           next(iter(private.batches)))
