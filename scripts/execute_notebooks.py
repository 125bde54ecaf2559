"""Runs every notebook top to bottom and saves it with its outputs.

So that a notebook opened on GitHub or in Colab shows its plots and numbers
before anyone runs it. Each runs in a fresh temporary folder (fresh
workdirs), at full size unless --small (the CI switch, DPJAX_NOTEBOOK_SMALL).
tests/test_notebooks.py re-executes them in CI and checks that the saved
copies carry outputs.

    python scripts/execute_notebooks.py                    # all, full size
    python scripts/execute_notebooks.py notebooks/quickstart.ipynb
"""

import argparse
import glob
import os
import sys
import tempfile
import time

import nbclient
import nbformat
import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def execute(path: str, small: bool) -> float:
  """Executes the notebook at ``path`` in place; returns the seconds taken."""
  notebook = nbformat.read(path, as_version=4)
  env = {'PYTHONPATH': ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')}
  if small:
    env['DPJAX_NOTEBOOK_SMALL'] = '1'
  else:
    os.environ.pop('DPJAX_NOTEBOOK_SMALL', None)
  os.environ.update(env)
  start = time.time()
  with tempfile.TemporaryDirectory() as workdir:
    nbclient.NotebookClient(
        notebook, timeout=3600, kernel_name='python3',
        resources={'metadata': {'path': workdir}}).execute()
  for cell in notebook.cells:  # no per-run timestamps in the diff
    cell.get('metadata', {}).pop('execution', None)
  nbformat.write(notebook, path)
  return time.time() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('paths', nargs='*', help='notebooks (default: all)')
  parser.add_argument('--small', action='store_true',
                      help='the CI size (DPJAX_NOTEBOOK_SMALL=1)')
  args = parser.parse_args()
  paths = args.paths or sorted(glob.glob(os.path.join(ROOT, 'notebooks',
                                                       '*.ipynb')))
  for path in tqdm.tqdm(paths, desc='notebooks', file=sys.stdout):
    seconds = execute(path, args.small)
    tqdm.tqdm.write(f'{os.path.relpath(path, ROOT)}: {seconds:.0f} s')


if __name__ == '__main__':
  main()
