"""Tests for dpjax/data/markov.py: the generated Markov-chain text tasks."""

import numpy as np
import pytest

from dpjax import data
from dpjax.data import markov


def test_splits_are_deterministic_shaped_and_disjoint():
  a, b = markov.load('markov'), markov.load('markov')
  np.testing.assert_array_equal(a.train.images, b.train.images)
  assert a.train.images.shape == (markov.TRAIN_SIZE, markov.LENGTH)
  assert a.train.images.dtype == np.int32 and a.num_classes == 4
  assert a.train.images.max() < markov.VOCAB_SIZE
  public = markov.load('markov_public')
  assert len(public.train) == markov.PUBLIC_SIZE
  np.testing.assert_array_equal(public.test.images, a.test.images)
  assert not (public.train.images[:, None] == a.train.images[None, :50]
              ).all(-1).any()


def test_language_model_labels_are_the_next_tokens():
  lm = markov.load('markov_lm')
  assert lm.num_classes == markov.VOCAB_SIZE
  np.testing.assert_array_equal(lm.train.images[:, 1:], lm.train.labels[:, :-1])


def test_bayes_ceilings_in_the_docstring():
  test = markov.load('markov').test
  assert markov.bayes_accuracy(test.images, test.labels) == pytest.approx(
      0.868, abs=5e-4)
  tokens, _ = markov.sample(markov.TEST_SIZE, markov.LENGTH + 1,
                            markov.SPLIT_SEEDS['test'])
  assert markov.bayes_next_token_accuracy(tokens) == pytest.approx(
      0.439, abs=5e-4)


def test_load_through_the_registry_and_structure_checks():
  splits = data.load('markov_lm')
  data.check_dataset(splits.train, 'train')
  assert data.input_field(splits.train.images) == 'tokens'
  with pytest.raises(ValueError, match='Unknown Markov task'):
    markov.load('markov_xl')
