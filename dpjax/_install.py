"""Installs dpjax around the jax a runtime already has (the notebooks' cell).

Colab and clusters ship jax built for their accelerator (CUDA plugin, libtpu).
A plain ``pip install`` of dpjax may replace it: the newest flax asks for a
newer jax than dpjax itself needs. This helper keeps an installed jax that
lies in dpjax's supported range (the ``jax``/``jaxlib`` requirements of
pyproject.toml, the one place that decides it) by pinning it, and the jax
plugins beside it, in a pip constraints file; it refuses, saying why and what
to do, when that jax is outside the range; with no jax at all it installs
jax from PyPI.

It runs before dpjax's dependencies exist, so it uses the standard library
(and pip's own copy of ``packaging`` where none is installed) and is run by
path::

  python dpjax/_install.py SOURCE [--extras test] [PIP_ARGS...]

where SOURCE is a local clone of dpjax (installed editable).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from typing import Callable, NamedTuple, Sequence

try:
  from packaging.requirements import Requirement
  from packaging.specifiers import SpecifierSet
except ImportError:  # a bare venv has pip's copy only
  from pip._vendor.packaging.requirements import Requirement
  from pip._vendor.packaging.specifiers import SpecifierSet

# jax and the packages that must move with it: jaxlib, the accelerator plugins.
_JAX_FAMILY = re.compile(r'^(jax|jaxlib|jax[-_](cuda|rocm)\d*[-_].*|libtpu.*)$',
                         re.I)


class Plan(NamedTuple):
  """What to do: ``ok`` False means stop with ``message``."""
  ok: bool
  keep: tuple[str, ...]  # pip constraint lines pinning the installed jax
  message: str


def supported_range(pyproject: str) -> dict[str, str]:
  """``{'jax': '>=...', 'jaxlib': '>=...'}`` as pyproject.toml declares them.

  Examples:
    >>> import os
    >>> here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    >>> sorted(supported_range(os.path.join(here, 'pyproject.toml')))
    ['jax', 'jaxlib']
  """
  with open(pyproject, 'rb') as f:
    deps = tomllib.load(f)['project']['dependencies']
  reqs = [Requirement(d) for d in deps]
  return {r.name: str(r.specifier) for r in reqs if r.name in ('jax', 'jaxlib')}


def installed_jax() -> dict[str, str]:
  """Versions of the installed jax family (jax, jaxlib, plugins, libtpu)."""
  found = {}
  for dist in importlib.metadata.distributions():
    name = dist.metadata['Name'] or ''
    if _JAX_FAMILY.match(name):
      # The first one on sys.path is the one imported; later ones are shadowed.
      found.setdefault(name.lower().replace('_', '-'), dist.version)
  return found


def plan(installed: dict[str, str], supported: dict[str, str]) -> Plan:
  """Keep, refuse or install jax, given what is installed and supported.

  Examples:
    >>> supported = {'jax': '>=0.8.0', 'jaxlib': '>=0.8.0'}
    >>> plan({'jax': '0.8.3', 'jaxlib': '0.8.3'}, supported).keep
    ('jax==0.8.3', 'jaxlib==0.8.3')
    >>> plan({'jax': '0.7.2', 'jaxlib': '0.7.2'}, supported).ok
    False
    >>> plan({}, supported).keep
    ()
  """
  wanted = ', '.join(f'{n}{s}' for n, s in sorted(supported.items()))
  if 'jax' not in installed:
    return Plan(True, (), 'No jax installed: pip installs the newest jax from'
                ' PyPI (the CPU build; for a GPU, install jax[cuda12] first).')
  outside = [f'{n} {installed.get(n, "(missing)")}'
             for n, spec in sorted(supported.items())
             if installed.get(n) is None or
             not SpecifierSet(spec).contains(installed[n], prereleases=True)]
  have = ', '.join(f'{n} {v}' for n, v in sorted(installed.items()))
  if outside:
    return Plan(False, (), (
        f'This runtime has {have}; dpjax supports {wanted}, and'
        f' {", ".join(outside)} {"is" if len(outside) == 1 else "are"} outside'
        ' that range. Nothing was installed.'
        ' Upgrade jax first (Colab GPU: pip install -U "jax[cuda12]"; TPU:'
        ' pip install -U "jax[tpu]"; CPU: pip install -U jax), restart the'
        ' runtime and run this again.'))
  keep = tuple(f'{n}=={v}' for n, v in sorted(installed.items()))
  return Plan(True, keep, f'Keeping the installed {have} (within {wanted}):'
              ' dpjax and its other dependencies are installed around it.')


def pip_command(source: str, constraints: str | None, extras: str = '',
                pip_args: Sequence[str] = ()) -> list[str]:
  """The pip command that installs ``source`` editable (with ``extras``)."""
  target = f'{source}[{extras}]' if extras else source
  cmd = [sys.executable, '-m', 'pip', 'install', '-e', target]
  if constraints:
    cmd += ['-c', constraints]
  return cmd + list(pip_args)


def install(source: str, extras: str = '', pip_args: Sequence[str] = (),
            run: Callable[..., object] = subprocess.run) -> Plan:
  """Installs dpjax from the clone ``source``, keeping a supported jax."""
  decision = plan(installed_jax(),
                  supported_range(os.path.join(source, 'pyproject.toml')))
  print(decision.message, flush=True)
  if not decision.ok:
    return decision
  with tempfile.TemporaryDirectory() as tmp:
    constraints = None
    if decision.keep:
      constraints = os.path.join(tmp, 'keep-jax.txt')
      with open(constraints, 'w') as f:
        f.write('\n'.join(decision.keep) + '\n')
    run(pip_command(source, constraints, extras, pip_args), check=True)
  return decision


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('source', help='a local clone of dpjax')
  parser.add_argument('--extras', default='', help='e.g. test')
  args, pip_args = parser.parse_known_args(argv)
  return 0 if install(args.source, args.extras, pip_args).ok else 1


if __name__ == '__main__':
  sys.exit(main())
