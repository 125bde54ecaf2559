"""dpjax: differentially private training for JAX/Flax.

Per-example gradients (:func:`clipped_grad`), clipping and noise as optax
transforms (:func:`clip_per_example`, :func:`add_gaussian_noise`), Poisson
sampling, and accounting on dp-accounting, tied together by :func:`make_plan`.
BatchNorm statistics under DP follow a policy (:func:`make_normalizer`).
:func:`make_private` makes an existing Flax training loop private in a few
lines (its batch loss kept: :func:`batch_of_one`; per-example dropout keys:
:func:`with_example_keys`).
"""

from dpjax.accounting import calibrate_noise_multiplier
from dpjax.accounting import PrivacyLedger
from dpjax.batch_loss import batch_of_one
from dpjax.clipping import clip_automatic
from dpjax.clipping import clip_normalized
from dpjax.clipping import clip_per_example
from dpjax.clipping import clip_per_layer
from dpjax.clipping import ClipOutput
from dpjax.clipping import PerExampleClipping
from dpjax.example_keys import with_example_keys
from dpjax.example_keys import with_indices
from dpjax.modelmix import clip_l2_then_linf
from dpjax.modelmix import mix_model_states
from dpjax.modelmix import ModelMixState
from dpjax.modelmix import modelmix_epsilon
from dpjax.noise import add_gaussian_noise
from dpjax.noise import add_gaussian_noise_from_state
from dpjax.noise import GaussianNoiseState
from dpjax.noise import private_aggregate
from dpjax.normalization import batchnorm_group_loss
from dpjax.normalization import make_normalizer
from dpjax.normalization import NormalizationConfig
from dpjax.per_example import clipped_grad
from dpjax.per_example import ClippedGrad
from dpjax.per_example import per_example_grads
from dpjax.per_example import PerExampleStats
from dpjax.per_example import StepInputs
from dpjax.private import make_private
from dpjax.private import Private
from dpjax.plan import ClippingConfig
from dpjax.plan import DPPlan
from dpjax.plan import make_plan
from dpjax.plan import PrivacyConfig
from dpjax.keys import KeySchedule
from dpjax.sampling import Batch
from dpjax.sampling import PaddedBatch
from dpjax.sampling import PoissonSampler

__version__ = '0.1.0'
