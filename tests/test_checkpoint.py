"""Tests for dpjax/checkpoint.py: ledger serialization, resume, corruption."""

import json
import os
import signal
import subprocess
import sys
import time

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from dpjax import accounting
from dpjax import checkpoint
from dpjax import sampling
from dpjax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GAUSSIAN = dp_accounting.GaussianDpEvent(1.1)
POISSON = dp_accounting.PoissonSampledDpEvent(0.01, GAUSSIAN)
EVENTS = [
    GAUSSIAN,
    POISSON,
    dp_accounting.SelfComposedDpEvent(POISSON, 1000),
    dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(POISSON, 10),
        dp_accounting.GaussianDpEvent(5.0),
        dp_accounting.ComposedDpEvent([GAUSSIAN, POISSON])]),
    dp_accounting.SampledWithoutReplacementDpEvent(100, 10, GAUSSIAN),
    dp_accounting.LaplaceDpEvent(0.5),
    dp_accounting.NonPrivateDpEvent(),
]


@pytest.mark.parametrize('event', EVENTS, ids=lambda e: type(e).__name__)
def test_dp_event_json_round_trip(event):
  text = json.dumps(checkpoint.event_to_json(event))
  back = checkpoint.event_from_json(json.loads(text))
  assert back == event
  assert type(back) is type(event)


def test_ledger_round_trip_keeps_epsilon():
  ledger = accounting.PrivacyLedger()
  ledger.record(POISSON, 500)
  ledger.record(dp_accounting.GaussianDpEvent(10.0))  # an extra release
  ledger.record(POISSON, 3)
  back = checkpoint.ledger_from_json(
      json.loads(json.dumps(checkpoint.ledger_to_json(ledger))))
  assert back == ledger
  assert back.epsilon(1e-5) == ledger.epsilon(1e-5)
  assert back.epsilon(1e-5, 'pld') == ledger.epsilon(1e-5, 'pld')


def test_unknown_events_are_refused_and_can_be_registered():
  class HomeMadeDpEvent(dp_accounting.DpEvent):
    pass

  with pytest.raises(TypeError, match='register_dp_event'):
    checkpoint.event_to_json(HomeMadeDpEvent())
  with pytest.raises(ValueError, match="'Bogus'"):
    checkpoint.event_from_json({'event_type': 'Bogus'})
  checkpoint.register_dp_event(HomeMadeDpEvent)
  assert isinstance(checkpoint.event_from_json(
      checkpoint.event_to_json(HomeMadeDpEvent())), HomeMadeDpEvent)


def test_privacy_fields_skip_performance_flags_only():
  config = default.get_config()
  fields = checkpoint.privacy_fields(config, 1000)
  assert fields['privacy.clip_norm'] == 1.0
  assert fields['dataset_size'] == 1000
  assert 'optimizer.learning_rate' in fields and 'seed' in fields
  assert not any(k.startswith('perf.') for k in fields)
  config.perf.microbatch_size = 7
  config.perf.num_devices = 4
  config.progress_bar = False
  assert checkpoint.privacy_fields(config, 1000) == fields
  config.privacy.clip_norm = 2.0
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r'privacy\.clip_norm: checkpoint 1\.0, now 2\.0'):
    checkpoint.check_same_run(fields, checkpoint.privacy_fields(config, 1000),
                              'here')


def _state(seed):
  key = jax.random.key(seed)
  return {'step': jnp.asarray(seed, jnp.int32),
          'params': {'w': jax.random.normal(key, (5, 3))},
          'noise_key': jax.random.split(key)[0]}


def _same(a, b):
  return checkpoint.tree_checksum(a) == checkpoint.tree_checksum(b)


def test_checkpointer_round_trip_is_bit_identical(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'ckpt'), {'a': 1})
  ckpt.save(3, _state(3), {'history': [1.5, float('inf')]})
  ckpt.close()
  state, meta = checkpoint.Checkpointer(str(tmp_path / 'ckpt'), {'a': 1}
                                        ).restore(_state(0))
  assert _same(state, _state(3))
  np.testing.assert_array_equal(jax.random.key_data(state['noise_key']),
                                jax.random.key_data(_state(3)['noise_key']))
  assert meta['step'] == 3 and meta['history'] == [1.5, float('inf')]
  with pytest.raises(checkpoint.CheckpointMismatchError, match='a: checkpoint'):
    checkpoint.Checkpointer(str(tmp_path / 'ckpt'), {'a': 2}).restore(
        _state(0))


def _largest_file(directory):
  files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def _corrupt(path):
  with open(path, 'r+b') as f:
    size = os.path.getsize(path)
    f.seek(size // 2)
    f.write(bytes(255 - b for b in f.read(64)))


@pytest.mark.parametrize('damage', ['state_bytes', 'meta', 'truncated'])
def test_corrupted_checkpoint_falls_back_to_previous(tmp_path, damage):
  directory = str(tmp_path / 'ckpt')
  ckpt = checkpoint.Checkpointer(directory, {'a': 1})
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {})
  ckpt.close()
  if damage == 'state_bytes':
    _corrupt(_largest_file(os.path.join(directory, '3', 'state')))
  elif damage == 'meta':
    with open(os.path.join(directory, '3', 'meta', 'metadata'), 'w') as f:
      f.write('{"half-written')
  else:
    path = _largest_file(os.path.join(directory, '3', 'state'))
    os.truncate(path, os.path.getsize(path) // 2)
  # A partial checkpoint (killed while writing) is never committed.
  os.makedirs(os.path.join(directory, '4.orbax-checkpoint-tmp-1'))

  ckpt = checkpoint.Checkpointer(directory, {'a': 1})
  state, meta = ckpt.restore(_state(0))
  assert meta['step'] == 2 and _same(state, _state(2))
  assert ckpt.all_steps() == [1, 2]
  assert os.listdir(tmp_path / 'corrupt_checkpoints')[0].startswith('3-')
  ckpt.save(3, _state(3), {})  # the step can be written again
  ckpt.close()


def test_no_good_checkpoint_means_a_fresh_start(tmp_path):
  directory = str(tmp_path / 'ckpt')
  ckpt = checkpoint.Checkpointer(directory, {'a': 1})
  ckpt.save(1, _state(1), {})
  ckpt.close()
  _corrupt(_largest_file(os.path.join(directory, '1', 'state')))
  assert checkpoint.Checkpointer(directory, {'a': 1}).restore(_state(0)) is None


def test_sampler_position_is_the_step():
  """Batches are a pure function of (seed, step), whatever the padding."""
  a = sampling.PoissonSampler(1000, 64, key=jax.random.key(5))
  b = sampling.PoissonSampler(1000, 64, key=jax.random.key(5), pad_to_multiple_of=128)
  for step in (0, 7, 123):
    x, y = a.sample(step), b.sample(step)
    np.testing.assert_array_equal(x.indices[:x.size], y.indices[:y.size])
    np.testing.assert_array_equal(x.indices, a.sample(step).indices)
  assert not np.array_equal(a.sample(1).indices[:10], a.sample(2).indices[:10])


STEPS, EVERY = 40, 4
# One padded batch size (384 > any Poisson batch of the digits here): one
# compilation per run.
OVERRIDES = {'privacy.steps': STEPS, 'privacy.noise_multiplier': 1.0,
             'privacy.target_epsilon': None,
             'perf.checkpoint_every_steps': EVERY, 'eval_every_steps': 20,
             'perf.pad_to_multiple_of': 384, 'progress_bar': False}


def _config(**changes):
  config = default.get_config()
  for path, value in {**OVERRIDES, **changes}.items():
    *sections, field = path.split('.')
    node = config
    for s in sections:
      node = node[s]
    node[field] = value
  return config


def _committed(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _final_checksum(workdir):
  meta = os.path.join(workdir, 'checkpoints', str(STEPS), 'meta', 'metadata')
  with open(meta) as f:
    return json.load(f)['checksum']


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  return workdir, train.train_and_evaluate(_config(), workdir)


@pytest.mark.parametrize('noise_seed', [None, 7])
def test_sigkill_then_resume_is_bit_identical(noise_seed, tmp_path):
  """SIGKILL mid-run, corrupt the newest checkpoint, resume: same result.

  Without noise_seed the secret comes from the OS entropy and the resumed
  run must keep it: it ends bit-identical to an uninterrupted run given that
  secret as its noise_seed.
  """
  workdir = str(tmp_path / 'killed')
  overrides = dict(OVERRIDES)
  if noise_seed is not None:
    overrides['privacy.noise_seed'] = noise_seed
  args = [f'--config.{k}={v}' for k, v in overrides.items()]
  proc = subprocess.Popen(
      [sys.executable, '-m', 'dpjax.main', '--workdir', workdir] + args,
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while len(_committed(workdir)) < 2 and proc.poll() is None:
    assert time.time() < deadline
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, err[-2000:]
  committed = _committed(workdir)
  assert committed[-1] < STEPS and len(committed) >= 2
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))
  _corrupt(_largest_file(os.path.join(workdir, 'checkpoints',
                                      str(committed[-1]), 'state')))

  config = _config(**{'privacy.noise_seed': noise_seed})
  summary = train.train_and_evaluate(config, workdir)
  assert summary['resumed_from_steps'] == [committed[-2]]
  ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, 'checkpoints'),
      checkpoint.privacy_fields(config, summary['dataset_size']))
  secret = ckpt.stored_secret()
  ckpt.close()
  assert noise_seed is None or secret == noise_seed
  ref_dir = str(tmp_path / 'uninterrupted')
  ref = train.train_and_evaluate(_config(**{'privacy.noise_seed': secret}),
                                 ref_dir)
  assert _final_checksum(workdir) == _final_checksum(ref_dir)
  assert summary['epsilon'] == ref['epsilon']
  assert summary['test_accuracy'] == ref['test_accuracy']
  assert summary['steps'] == STEPS


def test_resume_refuses_other_privacy_settings(uninterrupted):
  ref_dir, ref = uninterrupted
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r'privacy\.noise_multiplier: checkpoint 1\.0, now'
                     r' 2\.0'):
    train.train_and_evaluate(_config(**{'privacy.noise_multiplier': 2.0}),
                             ref_dir)
  # Performance flags may differ: the finished run is restored as it was.
  summary = train.train_and_evaluate(
      _config(**{'perf.microbatch_size': 16}), ref_dir)
  assert summary['resumed_from_steps'] == [STEPS]
  assert summary['epsilon'] == ref['epsilon']
  assert summary['test_accuracy'] == ref['test_accuracy']


def test_load_params_needs_a_finished_run(tmp_path):
  with pytest.raises(ValueError, match='has no summary.json'):
    checkpoint.load_params(str(tmp_path), 'markov')
  checkpoint.write_json_atomic(str(tmp_path / 'summary.json'), {
      'private': False, 'dataset': 'markov_public'})
  with pytest.raises(ValueError, match='no checkpoint under checkpoints/'):
    checkpoint.load_params(str(tmp_path), 'markov')


@pytest.mark.parametrize('summary', [
    {'private': False, 'dataset': 'markov'},
    {'private': False, 'dataset': 'dpjax_mnist',
     'config': {'data': {'name': 'mnist'}}},
])
def test_load_params_refuses_a_non_private_run_on_the_private_data(
    tmp_path, summary):
  checkpoint.write_json_atomic(str(tmp_path / 'summary.json'), summary)
  with pytest.raises(ValueError, match='would publish that data'):
    checkpoint.load_params(str(tmp_path), summary.get('config', {}).get(
        'data', {}).get('name', summary['dataset']))
