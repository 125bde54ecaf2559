"""Default: DP-SGD on scikit-learn's embedded 8x8 digits, offline, seconds.

Targets (tests/test_train.py): epsilon <= 3 at delta = 1e-5 and >= 85% test
accuracy on the 359 held-out digits. Measured: 93.3-94.4% over seeds 0-2
(docs/BENCHMARKS.md).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = 'digits'
  # Raw files of 'mnist', 'fashion_mnist', 'cifar10' (None:
  # $DPJAX_DATA_DIR/<dataset>) and the cache of their prepared copy, keyed on
  # the files' SHA-256 (None: $DPJAX_CACHE_DIR, else <workdir>/data_cache).
  config.data.manual_dir = ml_collections.config_dict.placeholder(str)
  config.data.tfds_data_dir = ml_collections.config_dict.placeholder(str)
  # name = 'arrays': your own .npz file (images, labels, optionally
  # test_images, test_labels; dpjax/data/arrays.py). Without a test split,
  # test_fraction of it is held out; num_classes None: largest label + 1.
  config.data.path = ml_collections.config_dict.placeholder(str)
  config.data.num_classes = ml_collections.config_dict.placeholder(int)
  config.data.test_fraction = 0.1
  # Fraction of the training set held out as PUBLIC data (removed from the
  # private set; used for BatchNorm statistics or clip thresholds).
  config.data.public_fraction = 0.0
  # Or another dataset's training split as public data (same image shape),
  # read from public_manual_dir; public_size keeps that many public examples.
  config.data.public_dataset = ml_collections.config_dict.placeholder(str)
  config.data.public_manual_dir = ml_collections.config_dict.placeholder(str)
  config.data.public_size = ml_collections.config_dict.placeholder(int)
  # A seeded subset of the private training set (small experiments).
  config.data.train_size = ml_collections.config_dict.placeholder(int)
  # Fixed per-example features instead of pixels: 'scatternet' (the
  # scattering transform of Tramer & Boneh 2021, for the 'scatter_linear'
  # and 'scatter_cnn' models), computed once and cached with the prepared data.
  config.data.features = ml_collections.config_dict.placeholder(str)

  config.model = ml_collections.ConfigDict()
  config.model.name = 'small_cnn'
  # None: the model's default (tanh for the CNNs, relu for the ResNets, mish
  # for ResNet-9).
  config.model.activation = ml_collections.config_dict.placeholder(str)
  # Residual networks (dpjax/resnets.py): 'none' | 'group' | 'batch' (None:
  # the model's default), GroupNorm groups (None: default), ScaleNorm, a
  # channel-width multiplier, learned scale/bias in the norms.
  config.model.norm = ml_collections.config_dict.placeholder(str)
  config.model.num_groups = ml_collections.config_dict.placeholder(int)
  config.model.scale_norm = False
  config.model.width = 1.0
  config.model.affine = True
  # Transformers (dpjax/transformers.py; None: the model's default): width
  # dim, blocks, heads, MLP width, ViT patch size, decoder max_length,
  # vocab_size (token models: required) and pool ('none': a label per token,
  # 'last', 'mean'), dropout (each example keyed from the secret stream
  # keys.DROPOUT), an output tied to the token embedding; lora_rank > 0
  # freezes all but the head and trains LoRA adapters (dpjax/lora.py).
  placeholder = ml_collections.config_dict.placeholder
  config.model.dim = placeholder(int)
  config.model.depth = placeholder(int)
  config.model.num_heads = placeholder(int)
  config.model.mlp_dim = placeholder(int)
  config.model.patch_size = placeholder(int)
  config.model.max_length = placeholder(int)
  config.model.vocab_size = placeholder(int)
  config.model.pool = placeholder(str)
  config.model.dropout_rate = placeholder(float)
  config.model.tied_embedding = placeholder(bool)
  config.model.lora_rank = placeholder(int)
  config.model.lora_alpha = placeholder(float)
  # The workdir of a finished run whose parameters initialize this one
  # (fine-tuning; dpjax.checkpoint.load_params): it must have trained on
  # PUBLIC data only. A LoRA model takes them as its frozen weights.
  config.init_from = placeholder(str)

  # What DP training does with data-dependent collections such as BatchNorm
  # statistics (dpjax/normalization.py): 'reject' | 'public' | 'frozen' |
  # 'privatized' | 'privatized_once' | 'batch', or per collection
  # 'batch_stats:public,...'.
  config.normalization = ml_collections.ConfigDict()
  config.normalization.policy = 'reject'
  config.normalization.public_batch_size = 32
  config.normalization.stats_gradient = False
  config.normalization.momentum = 0.9
  config.normalization.stats_clip_norm = 10.0
  config.normalization.stats_budget = 0.1
  config.normalization.eval_statistics = 'public'
  config.normalization.once_noise_multiplier = 8.0  # 'privatized_once'

  # Everything that changes the privacy guarantee, and nothing else. A set
  # `steps` replaces `epochs`. Exactly one of `target_epsilon` (calibrates the
  # noise) and `noise_multiplier` is set: for a fixed noise, unset the target
  # (--config.privacy.noise_multiplier=1.1
  # --config.privacy.target_epsilon=None).
  config.privacy = ml_collections.ConfigDict()
  config.privacy.enabled = True
  config.privacy.clip_norm = 1.0
  config.privacy.noise_multiplier = ml_collections.config_dict.placeholder(
      float)
  config.privacy.target_epsilon = ml_collections.config_dict.placeholder(
      float)
  config.privacy.target_epsilon = 3.0  # calibrates noise_multiplier
  config.privacy.delta = 1e-5
  config.privacy.expected_batch_size = 256
  config.privacy.epochs = ml_collections.config_dict.placeholder(float)
  config.privacy.epochs = 20.0
  config.privacy.steps = ml_collections.config_dict.placeholder(int)
  config.privacy.accountant = 'rdp'
  # The secret seed of the sampler, the noise and every other mechanism
  # draw. None (default): drawn from the OS entropy, kept in the checkpoints
  # only, so two runs differ. Set it for a bit-identical rerun; the
  # guarantee then assumes it stays secret (whoever knows it can remove the
  # noise). config.seed only drives what may be public (init, data split).
  config.privacy.noise_seed = ml_collections.config_dict.placeholder(int)
  # Noise drawn as a sum of four Gaussians (Holohan & Braghin 2021), against
  # floating-point attacks on the Gaussian sampler (Jin et al. 2022).
  config.privacy.secure_noise = False
  # The clipping mode fixes sampler, relation and accountant event
  # (dpjax/plan.py, ClippingConfig): 'flat' | 'per_layer' | 'automatic' |
  # 'adaptive' per example with Poisson sampling; 'batch' (batch clipping of
  # groups of group_size) with shuffling and Gaussian DP (accountant 'gdp').
  config.privacy.clipping = ml_collections.ConfigDict()
  config.privacy.clipping.mode = 'flat'
  # 'none' | 'equal' | 'size' | 'sqrt_size' | 'alc' (public-data thresholds;
  # needs data.public_fraction > 0).
  config.privacy.clipping.layers = 'none'
  config.privacy.clipping.layer_groups = 'tensor'  # or 'module'
  config.privacy.clipping.layer_noise = 'isotropic'  # or 'per_layer'
  config.privacy.clipping.alc_every_epoch = False
  config.privacy.clipping.alc_decay = 1.0
  config.privacy.clipping.alc_public_examples = 1024
  config.privacy.clipping.gamma = 0.01  # automatic; 0: normalization
  config.privacy.clipping.target_quantile = 0.5  # adaptive
  config.privacy.clipping.quantile_learning_rate = 0.2
  config.privacy.clipping.count_noise_std = (
      ml_collections.config_dict.placeholder(float))  # None: batch / 20
  config.privacy.clipping.adaptive_accounting = 'sigma_eff'  # or 'compose'
  config.privacy.clipping.group_size = 1  # batch

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 2.0
  config.optimizer.momentum = 0.0
  config.optimizer.nesterov = False
  config.optimizer.schedule = 'constant'

  # Parameter freezing / per-step selection (dpjax/pruning.py). Masks come
  # from data-independent rules or the PUBLIC split only, so they cost no
  # privacy; sources that read the private set are refused.
  config.pruning = ml_collections.ConfigDict()
  config.pruning.mode = 'none'  # 'none' | 'freeze' | 'select'
  config.pruning.keep_fraction = 1.0
  # 'random' | 'magnitude_init' | 'magnitude_current' | 'public_magnitude' |
  # 'public_gradient'
  config.pruning.source = 'random'
  config.pruning.scope = 'global'  # 'global' | 'per_layer'
  config.pruning.public_batch_size = 256
  config.pruning.public_pretrain_steps = 0  # > 0 only for 'public_magnitude'
  config.pruning.public_learning_rate = 0.1

  # ModelMix (Xiao, Wan, Devadas 2022; dpjax/modelmix.py): each step mixes
  # the last two model states with a secret per-coordinate alpha, the two
  # kept >= tau = tau_over_lr * learning_rate apart; clipping becomes L2 to
  # clip_norm then each coordinate to clip_norm / sqrt(p). Reports the
  # ModelMix epsilon (`epsilon_modelmix`) beside the standard one.
  config.modelmix = ml_collections.ConfigDict()
  config.modelmix.enabled = False
  config.modelmix.tau_over_lr = 0.15
  config.modelmix.p = 100.0

  # Performance only: never changes the guarantee.
  config.perf = ml_collections.ConfigDict()
  config.perf.microbatch_size = ml_collections.config_dict.placeholder(int)
  config.perf.pad_to_multiple_of = ml_collections.config_dict.placeholder(int)
  # Devices of the data-parallel mesh (0: all); rows per device call, the
  # clipped sums of a logical batch's physical batches are accumulated and
  # noised once (None: the whole batch in one call); checkpoints every k
  # steps (None: at every evaluation; 0: never); jax.distributed.initialize()
  # first (multi-host).
  config.perf.num_devices = 1
  config.perf.physical_batch_size = ml_collections.config_dict.placeholder(
      int)
  config.perf.checkpoint_every_steps = (
      ml_collections.config_dict.placeholder(int))
  config.perf.distributed = False

  # How per-example clipping is computed (same result every way):
  # 'vmap' per-example gradients; 'bookkeeping' ghost norms / per-layer
  # gradients and book-kept sums, fastest per layer; 'ghost' the same with
  # the least memory per layer; 'auto' bookkeeping when possible.
  config.perf.grad_route = 'auto'
  # If set, microbatch_size is the largest that fits this many MiB (XLA's
  # memory analysis of the compiled step); leave microbatch_size unset.
  config.perf.memory_budget_mb = ml_collections.config_dict.placeholder(float)
  # Parameter averages evaluated beside the raw parameters (post-processing:
  # no privacy cost). ema_decay None: no EMA.
  config.averaging = ml_collections.ConfigDict()
  config.averaging.ema_decay = ml_collections.config_dict.placeholder(float)
  config.averaging.polyak = False
  config.averaging.polyak_start_step = 0

  # Augmentation multiplicity (De et al. 2022): per-example gradients averaged
  # over num_views augmented views before clipping (0: no augmentation).
  config.augmult = ml_collections.ConfigDict()
  config.augmult.num_views = 0
  config.augmult.augmentations = ('shift',)

  config.eval_every_steps = 0  # 0: ten evaluations per run
  # Test examples (a seeded subset) of the evaluations during training; the
  # last evaluation always uses the whole test set. None: always all.
  config.eval_size = ml_collections.config_dict.placeholder(int)
  config.log_every_steps = 10
  config.progress_bar = True
  return config
