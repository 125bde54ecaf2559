"""Tests for dpjax/_install.py, the declared version range and the notebooks'
install cell."""

import glob
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from dpjax import _install

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(ROOT, 'pyproject.toml')
LOWER = os.path.join(ROOT, '.ci', 'constraints-lower.txt')
SUPPORTED = {'jax': '>=0.8.0', 'jaxlib': '>=0.8.0'}


def _requirements():
  with open(PYPROJECT, 'rb') as f:
    deps = tomllib.load(f)['project']['dependencies']
  return {r.name: r for r in map(Requirement, deps)}


def _lower_pins():
  with open(LOWER) as f:
    lines = [l.split('#')[0].strip() for l in f]
  return dict(l.split('==') for l in lines if l)


def test_constraints_pin_exactly_the_declared_lower_bounds():
  reqs = _requirements()
  pins = _lower_pins()
  assert len(pins) >= 7
  for name, version in pins.items():
    specs = {(s.operator, s.version) for s in reqs[name].specifier}
    assert ('>=', version) in specs, (name, version, reqs[name])


def test_readme_states_the_declared_lower_bounds():
  with open(os.path.join(ROOT, 'README.md')) as f:
    section = f.read().split('## Supported versions')[1].split('\n## ')[0]
  section = ' '.join(section.split())
  pins = _lower_pins()
  assert f'jax and jaxlib {pins["jax"]} to' in section
  for name in set(pins) - {'jax', 'jaxlib'}:
    assert f'{name} >= {pins[name]}' in section, name


def test_supported_range_is_read_from_pyproject():
  pins = _lower_pins()
  assert _install.supported_range(PYPROJECT) == {
      'jax': f'>={pins["jax"]}', 'jaxlib': f'>={pins["jaxlib"]}'}


def test_installed_jax_is_found():
  found = _install.installed_jax()
  assert found['jax'] == importlib.metadata.version('jax')
  assert found['jaxlib'] == importlib.metadata.version('jaxlib')
  assert 'jaxtyping' not in found


def test_a_supported_jax_and_its_plugins_are_pinned():
  installed = {'jax': '0.9.1', 'jaxlib': '0.9.1',
               'jax-cuda12-plugin': '0.9.1', 'jax-cuda12-pjrt': '0.9.1'}
  decision = _install.plan(installed, SUPPORTED)
  assert decision.ok
  assert decision.keep == ('jax==0.9.1', 'jax-cuda12-pjrt==0.9.1',
                           'jax-cuda12-plugin==0.9.1', 'jaxlib==0.9.1')
  assert 'Keeping the installed' in decision.message


@pytest.mark.parametrize('installed, culprit', [
    ({'jax': '0.7.2', 'jaxlib': '0.7.2'}, 'jax 0.7.2'),
    ({'jax': '0.8.0', 'jaxlib': '0.6.2'}, 'jaxlib 0.6.2'),
    ({'jax': '0.8.0'}, 'jaxlib (missing)'),
])
def test_a_jax_outside_the_range_is_refused_with_the_fix(installed, culprit):
  decision = _install.plan(installed, SUPPORTED)
  assert not decision.ok and not decision.keep
  assert culprit in decision.message
  assert 'jax>=0.8.0' in decision.message
  assert 'pip install -U' in decision.message


def test_no_jax_installs_from_pypi():
  decision = _install.plan({}, SUPPORTED)
  assert decision.ok and not decision.keep
  assert 'newest jax' in decision.message


def test_install_passes_the_installed_jax_as_a_constraint(tmp_path):
  calls = []

  def run(cmd, check):
    assert check
    constraints = cmd[cmd.index('-c') + 1]
    with open(constraints) as f:
      calls.append((cmd, f.read().split()))

  decision = _install.install(ROOT, extras='test', pip_args=['--dry-run'],
                              run=run)
  assert decision.ok
  [(cmd, pins)] = calls
  assert cmd[:5] == [sys.executable, '-m', 'pip', 'install', '-e']
  assert cmd[5] == f'{ROOT}[test]' and cmd[-1] == '--dry-run'
  assert f'jax=={importlib.metadata.version("jax")}' in pins


def test_install_refuses_without_running_pip(monkeypatch):
  monkeypatch.setattr(_install, 'installed_jax',
                      lambda: {'jax': '0.4.30', 'jaxlib': '0.4.30'})
  run = lambda *a, **k: pytest.fail('pip ran')
  assert not _install.install(ROOT, run=run).ok
  assert _install.main([ROOT]) == 1


def test_the_script_runs_by_path_without_importing_dpjax():
  # The notebooks' cell runs it before dpjax's dependencies exist.
  script = os.path.join(ROOT, 'dpjax', '_install.py')
  proc = subprocess.run(
      [sys.executable, '-I', '-c',
       'import runpy, sys; sys.modules["jax"] = None;'
       f'm = runpy.run_path({script!r});'
       f'print(m["supported_range"]({PYPROJECT!r}))'],
      capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "'jax': '>=" in proc.stdout


def _install_cells():
  cells = []
  for path in sorted(glob.glob(os.path.join(ROOT, 'notebooks', '*.ipynb'))):
    with open(path) as f:
      code = [c for c in json.load(f)['cells'] if c['cell_type'] == 'code']
    cells.append((path, ''.join(code[0]['source'])))
  return cells


def test_every_notebook_starts_with_the_same_install_cell():
  cells = _install_cells()
  assert len(cells) >= 5
  first = cells[0][1]
  for path, cell in cells:
    assert cell == first, f'{path}: its install cell differs from {cells[0][0]}'
  assert "'dpjax', '_install.py'" in first
  assert 'DPJAX_SOURCE' in first
  assert 'jax.devices()' in first
  assert not re.search(r'https?://', first)  # no made-up repository URL
