"""docs/COMPOSITION.md is current, and the refusal table is the only one.

Cross-feature refusals live in dpjax/training/features.py (``REFUSALS``);
the generated doc lists every combination. Runs on several devices are
checked against one device in tests/test_distributed.py.
"""

import importlib.util
import os

import pytest

from dpjax.training import features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
  spec = importlib.util.spec_from_file_location(
      'composition', os.path.join(ROOT, 'scripts', 'composition.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_composition_doc_is_current():
  with open(os.path.join(ROOT, 'docs', 'COMPOSITION.md')) as f:
    assert f.read() == _script().render(), (
        'docs/COMPOSITION.md is stale: run python scripts/composition.py')


def test_devices_and_accumulation_refuse_nothing():
  for s in features.selections():
    base = features.refusal_of(s._replace(devices=1, accumulation=False))
    assert features.refusal_of(s) is base


def test_every_refusal_is_a_privacy_refusal():
  # A route or feature that is not implemented is not a reason to refuse.
  assert all(refusal.privacy for refusal in features.REFUSALS)


def test_every_refusal_says_why_and_how_to_fix():
  for refusal in features.REFUSALS:
    assert len(refusal.reason) > 60
    assert 'set ' in refusal.reason or 'use ' in refusal.reason


@pytest.mark.parametrize('selection,match', [
    (features.Selection(mode='flat', normalization='batch'),
     'only clipping.mode=.batch. bounds'),
    (features.Selection(mode='batch', normalization='privatized'),
     "shuffling accountant"),
])
def test_check_raises_the_reason(selection, match):
  with pytest.raises(ValueError, match=match):
    features.check(selection)


@pytest.mark.parametrize('selection', [
    features.Selection(mode='batch', normalization='batch', devices=8,
                       accumulation=True),
    features.Selection(mode='flat', route='bookkeeping', devices=8),
    features.Selection(mode='flat', normalization='privatized', devices=8),
    features.Selection(mode='flat', pruning='select', modelmix=True),
    features.Selection(mode='flat', normalization='privatized', modelmix=True,
                       augmult=True),
    features.Selection(mode='none', pruning='freeze'),
    features.Selection(mode='per_layer', route='ghost', devices=8),
    features.Selection(mode='adaptive', route='bookkeeping', pruning='freeze'),
    features.Selection(mode='flat', route='bookkeeping',
                       normalization='privatized', pruning='select'),
    features.Selection(mode='flat', route='ghost', normalization='public',
                       augmult=True),
    features.Selection(mode='batch', route='bookkeeping', devices=8),
    features.Selection(mode='flat', route='ghost', modelmix=True),
    features.Selection(mode='batch', normalization='batch', augmult=True),
    features.Selection(mode='none', normalization='frozen', augmult=True),
])
def test_what_used_to_be_refused_now_composes(selection):
  features.check(selection)
