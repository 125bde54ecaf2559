"""Every config in configs/ loads, passes validation and finds its data."""

import glob
import importlib
import os
import pickle

import numpy as np
import pytest

from dpjax import config_validation
from dpjax import train
from dpjax.data import cifar10
from dpjax.data import fashion_mnist
from dpjax.data import idx
from dpjax.data import idx_builder
from dpjax.data import mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/_*.py hold settings shared by several configs; they are no config.
CONFIGS = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(
    os.path.join(REPO, 'configs', '*.py'))
    if not os.path.basename(p).startswith('_'))
BUILDERS = {'mnist': mnist.Mnist, 'fashion_mnist': fashion_mnist.FashionMnist,
            'cifar10': cifar10.Cifar10}


@pytest.fixture
def data_root(tmp_path, monkeypatch):
  """$DPJAX_DATA_DIR laid out as the data README says, with tiny files."""
  for name in ('mnist', 'fashion_mnist'):
    directory = tmp_path / name
    directory.mkdir()
    for split in ('train', 't10k'):
      idx.write_idx(directory / f'{split}-images-idx3-ubyte.gz',
                    np.zeros((2, 28, 28), np.uint8))
      idx.write_idx(directory / f'{split}-labels-idx1-ubyte.gz',
                    np.zeros(2, np.uint8))
  batches = tmp_path / 'cifar10' / 'cifar-10-batches-py'
  batches.mkdir(parents=True)
  for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
    with open(batches / name, 'wb') as f:
      pickle.dump({b'data': np.zeros((1, 3072), np.uint8), b'labels': [0]}, f)
  monkeypatch.setenv('DPJAX_DATA_DIR', str(tmp_path))
  return tmp_path


@pytest.mark.parametrize('name', CONFIGS)
def test_config_finds_its_data_and_validates(name, data_root):
  config = importlib.import_module(f'configs.{name}').get_config()
  config_validation.validate_config(config)
  train.privacy_config(config)
  dirs = [(config.data.name, config.data.manual_dir)]
  if config.data.get('public_dataset'):
    dirs.append((config.data.public_dataset, config.data.public_manual_dir))
  for dataset, manual_dir in dirs:
    if dataset in BUILDERS:
      found = idx_builder.check_manual_dir(BUILDERS[dataset], manual_dir)
      assert found.startswith(str(data_root))


def test_cifar10_modelmix_reads_the_python_batches(data_root):
  """The README's command used to fail: the path lacked cifar-10-batches-py."""
  from configs import cifar10_modelmix  # pylint: disable=g-import-not-at-top
  config = cifar10_modelmix.get_config()
  assert config.data.manual_dir == os.path.join(
      str(data_root), 'cifar10', 'cifar-10-batches-py')
  assert idx_builder.check_manual_dir(
      cifar10.Cifar10, config.data.manual_dir) == config.data.manual_dir


def test_vit_mnist_takes_fashion_mnist_and_refuses_others(data_root):
  from configs import vit_mnist  # pylint: disable=g-import-not-at-top
  config = vit_mnist.get_config('fashion_mnist')
  config_validation.validate_config(config)
  assert idx_builder.check_manual_dir(
      fashion_mnist.FashionMnist, config.data.manual_dir).startswith(
          str(data_root))
  with pytest.raises(ValueError, match='vit_mnist.py takes one of'):
    vit_mnist.get_config('cifar10')
