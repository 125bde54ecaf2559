"""The README's Python snippets run as written."""

import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'README.md')


def test_readme_python_blocks_run():
  with open(README) as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), re.S)
  assert len(blocks) >= 2
  namespace = {}
  for block in blocks:  # later blocks reuse earlier imports, as a reader would
    exec(compile(block, README, 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['ledger'].epsilon(1e-5) > 0


def test_readme_starts_with_install_and_test_commands():
  with open(README) as f:
    text = f.read()
  commands = re.findall(r'```bash\n(.*?)```', text, re.S)
  assert 'pip install' in commands[0] and 'dpjax-train' in commands[0]
  assert commands[1].strip() == 'python -m pytest'
  with open(os.path.join(os.path.dirname(README), '.ci', 'run')) as f:
    assert 'python -m pytest' in f.read()
