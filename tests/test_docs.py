"""Every python block in docs/guide/*.md runs as written (one namespace per file)."""

import glob
import os
import re

import pytest

GUIDES = sorted(glob.glob(os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs',
    'guide', '*.md')))


def test_there_are_guides():
  assert GUIDES


@pytest.mark.parametrize('path', GUIDES, ids=os.path.basename)
def test_guide_snippets_run(path):
  with open(path) as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), re.S)
  assert blocks, f'{path} has no python snippet'
  namespace = {}
  for block in blocks:
    exec(compile(block, path, 'exec'), namespace)  # pylint: disable=exec-used
