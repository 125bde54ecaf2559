"""Every notebook in notebooks/ runs top to bottom (small-size switch on)."""

import glob
import os

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'notebooks', '*.ipynb')))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch, tmp_path):
  monkeypatch.setenv('DPJAX_NOTEBOOK_SMALL', '1')
  monkeypatch.setenv('PYTHONPATH', ROOT + os.pathsep + os.environ.get(
      'PYTHONPATH', ''))
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600,
                                   kernel_name='python3',
                                   resources={'metadata': {'path': tmp_path}})
  client.execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code'
             for o in cell.get('outputs', [])]
  assert not [o for o in outputs if o.get('output_type') == 'error']
  # Every notebook shows something: a plot or printed numbers.
  assert any(o.get('output_type') in ('display_data', 'stream')
             for o in outputs)


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_saved_with_its_outputs(path):
  # Opened on GitHub or Colab, it shows its results before anyone runs it
  # (scripts/execute_notebooks.py saves them).
  notebook = nbformat.read(path, as_version=4)
  code = [c for c in notebook.cells if c.cell_type == 'code']
  outputs = [o for cell in code for o in cell.get('outputs', [])]
  assert all(cell.get('execution_count') for cell in code), path
  assert not [o for o in outputs if o.get('output_type') == 'error']
  assert any(o.get('output_type') == 'display_data' for o in outputs), path
