"""Hypothesis strategies shared by the property tests of the clipping modes."""

from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import numpy as np

# Rows mixing ordinary values, huge ones (whose squares overflow float32),
# NaN and +-Inf: every kind of row an adversary or a bug can produce.
ELEMENTS = st.one_of(
    st.floats(-10, 10, width=32),
    st.sampled_from([1e30, -1e30, 3e38, np.nan, np.inf, -np.inf, 0.0]),
)


def batches(batch_size: int):
  """Per-example gradient pytrees {'a': [B, 3], 'b': [B, 2, 2]} of ELEMENTS."""
  return st.fixed_dictionaries({
      'a': hnp.arrays(np.float32, (batch_size, 3), elements=ELEMENTS),
      'b': hnp.arrays(np.float32, (batch_size, 2, 2), elements=ELEMENTS),
  })
