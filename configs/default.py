"""The reference training recipe (docs/method.md, "Training recipe"), for every dataset.

Every recipe value lives here; dataset configs only say what differs.
    python main.py --config configs/default.py   # CIFAR-10, lkca_b, full recipe
"""

import ml_collections
from ml_collections.config_dict import placeholder

from lkca_jax.layers import MIXERS
from lkca_jax.layers.lkca import DEFAULT_KERNEL_MOVE


def model_overrides() -> ml_collections.ConfigDict:
  """Preset fields that `--config.model_overrides.<field>=...` may replace."""
  return ml_collections.ConfigDict(
    {
      "mixer": placeholder(str),  # a registry name, or a comma pattern "lkca,mhsa"
      "dim": placeholder(int),
      "depth": placeholder(int),
      "num_heads": placeholder(int),
      "mlp_ratio": placeholder(float),
      "drop_path_rate": placeholder(float),
      "drop_path_schedule": placeholder(str),  # "uniform" (every block) or "linear" (0 → rate)
      "pool": placeholder(str),
      # "reference" (the LKCA authors' init, LayerNorm eps and MHSA) or "deit" (as DeiT builds
      # its ViTs with timm); models.CONVENTIONS.
      "convention": placeholder(str),
      # Constructor options per mixer name, one for each option a registered mixer lists in
      # its `config_options` (e.g. mixer_options.lkca.view: "auto", "conv" or "attention";
      # see the mixer's docstring). Unset ones keep the mixer's default.
      "mixer_options": ml_collections.ConfigDict(
        {
          name: {
            option: placeholder(str if isinstance(kind, tuple) else kind)
            for option, kind in cls.config_options.items()
          }
          for name, cls in MIXERS.items()
        }
      ),
    }
  )


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Runs trained side by side in one process (README, "Many runs in one process"): seeds
  # seed..seed+num_runs-1, each crossed with every combination of `sweep`, e.g.
  # "optimizer.learning_rate=1e-3,5e-4;label_smoothing=0.0,0.1" (empty: no sweep).
  config.num_runs = 1
  config.sweep = ""

  # Model: a preset of lkca_jax.models.PRESETS, optionally overridden.
  config.model = "lkca_b"
  config.model_overrides = model_overrides()
  config.patch_size = placeholder(int)  # None: image size / 8, an 8x8 grid
  config.dtype = "float32"  # compute dtype; "bfloat16" for mixed precision
  # Fine-tuning at another image size or on other classes (docs/usage.md, "Another image
  # size or dataset"): start from the parameters of a workdir's newest checkpoint or of a
  # checkpoint step directory, moved to this model's grid, with a fresh optimizer at step 0.
  # The workdir's own checkpoint, once there is one, wins: the run resumes from it. LKCA
  # kernels move as init_from_kernels says: "pad" (each tap keeps its offset in patches) or
  # "resample" (its fraction of the image).
  config.init_from = placeholder(str)
  config.init_from_kernels = DEFAULT_KERNEL_MOVE  # "resample", by measurement
  # The classifier: "keep" the checkpoint's (the same classes) or "new" (this dataset's
  # classes, initialised as a fresh run's): pre-trained on one dataset, fine-tuned on another.
  config.init_from_head = "keep"
  # True: start from the moving average of init_from's parameters (a run with ema_decay > 0).
  config.init_from_average = False

  config.dataset = ml_collections.ConfigDict(
    {
      "name": "cifar10",
      "data_dir": placeholder(str),  # TFDS data_dir (prepared copies live here)
      "manual_dir": placeholder(str),  # where a manual download (tiny-imagenet-200.zip) lies
      "download": True,  # False: never touch the network, fail if not prepared
      # "device", "host", "stream" (read from array_record as batches are due, for data
      # larger than memory) or "auto" (the first that fits: lkca_jax.data.pipeline).
      "placement": "auto",
      # Streaming only: the host's per-image step before the device augmentation: "resize"
      # (shorter side to the training size, centre crop) or "random_resized" (a box of area
      # share stream_crop_scale and aspect (w/h) stream_crop_ratio, resized: DeiT's crop).
      "stream_crop": "resize",
      "stream_crop_scale": (0.08, 1.0),
      "stream_crop_ratio": (3 / 4, 4 / 3),
      # Evaluation: shorter side to size / fraction, then the centre crop (DeiT: 0.875), as
      # torchvision's Resize and CenterCrop (streamed data; in memory only 1.0).
      "eval_crop_fraction": 1.0,
      "stream_workers": 0,  # grain worker processes decoding; 0: threads of this process
      # Square size images are used at, in pixels (None: the dataset's own). A fixed-size
      # dataset is resized once as loaded (antialiased bilinear); one whose images vary in
      # size (imagenet2012) is centre-cropped as evaluated whole, or streamed.
      "image_size": placeholder(int),
      # Subsets for quick runs: keep the first `classes` labels (0: all) and at
      # most `train_per_class` training images of each (0: all).
      "classes": 0,
      "train_per_class": 0,
      "mean": (0.4914, 0.4822, 0.4465),
      "std": (0.2470, 0.2435, 0.2616),
    }
  )

  # Per-image augmentation, in this order (docs/method.md, "Training recipe").
  config.augment = ml_collections.ConfigDict(
    {
      "flip": True,
      "crop_padding": 4,
      # An AutoAugment policy ("cifar10", "svhn", "imagenet"), a RandAugment in timm's form
      # ("rand-m9-mstd0.5-inc1"), or "none" / unset: off.
      "autoaugment": "cifar10",
      "random_erasing": 0.25,
      "erasing_area": (0.02, 0.4),
      "erasing_aspect": (0.3, 1 / 0.3),  # height / width
      # How the aspect is drawn in erasing_aspect: "uniform" (the reference; 3 boxes in 4 are
      # taller than wide) or "log_uniform" (torchvision: tall and wide equally likely).
      "erasing_aspect_sampling": "uniform",
      "erasing_attempts": 100,  # tries to fit a box before leaving the image (torchvision: 10)
      # What fills the box: "mean" (the reference: the dataset mean values written into the
      # normalised image, a lighter grey), "zero" (0 after normalisation, the mean colour)
      # or "pixel" (timm's, DeiT's: N(0, 1) noise for each pixel and channel).
      "erasing_fill": "mean",
    }
  )

  # Batch-level CutMix / Mixup.
  config.mixing = ml_collections.ConfigDict(
    {
      "prob": 0.5,  # chance that a batch is mixed at all
      "cutmix_prob": 0.5,  # chance that a mixed batch uses CutMix rather than Mixup
      "cutmix_alpha": 1.0,
      "mixup_alpha": 1.0,
      # Each image's partner: its image in a random "permutation" of the batch (the
      # reference's) or in the batch "reversed" (timm's Mixup, DeiT's).
      "partner": "permutation",
      # 1: the batch is mixed as one. G: as G processes of a PyTorch trainer mix theirs
      # (timm's Mixup in each): rows g, g + G, ... pair among themselves, each group with its
      # own draws.
      "groups": 1,
    }
  )
  config.label_smoothing = 0.1

  config.optimizer = ml_collections.ConfigDict(
    {
      "learning_rate": 1e-3,
      "b1": 0.9,
      "b2": 0.999,
      "eps": 1e-8,
      "weight_decay": 0.05,
      # "all" parameters (the reference), or only the "weights": not biases, norms, scalars,
      # position tables or the class token (timm's rule, as DeiT trains).
      "weight_decay_on": "all",
      # "warmup_cosine": the rate moves every step, warmup then one cosine to the end;
      # "deit_epochs": once an epoch, as DeiT's main.py steps timm's cosine (whole warmup epochs).
      "schedule": "warmup_cosine",
      "warmup_epochs": 10.0,  # a fraction of an epoch too: rounded to whole steps
      # Set: the warmup is this share of the run's steps instead (warmup_cosine only), e.g.
      # 0.1, the recipe's share, in a run shortened by num_train_steps.
      "warmup_fraction": placeholder(float),
      "init_learning_rate": 1e-6,
      "end_learning_rate": 1e-6,
    }
  )

  # > 0: also keep an exponential moving average of the parameters with this decay a step,
  # evaluated beside them (test_ema_top1 ...); 0: none.
  config.ema_decay = 0.0
  config.batch_size = 128  # global, split over all devices
  # The batch computed as M slices, one after another, their gradients averaged: the same
  # step in about 1/M of the activation memory (stochastic depth draws per slice).
  config.microbatches = 1
  config.num_epochs = 100
  config.repeats = 3  # repeated augmentation: one epoch = 3 augmented passes
  # How an epoch's passes are ordered: "independent" (the reference: `repeats` independent
  # shuffles back to back, no image twice in a pass), "joint" (one shuffle of `repeats`
  # stacked copies: an image can appear twice in one batch) or "adjacent" (one shuffle, each
  # image's copies side by side, so in one step: DeiT's repeated augmentation).
  config.epoch_order = "independent"
  # How long an epoch is: "repeats" (all `repeats` passes) or "images" (as many samples as
  # there are images, the first of that order: DeiT's epoch, a third of the images 3 times).
  config.epoch_length = "repeats"
  config.num_train_steps = -1  # -1: num_epochs * steps per epoch
  config.num_devices = 0  # 0: every device of every host

  config.eval_every_steps = -1  # -1: once an epoch, on the full test split
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3  # the latest K, plus the best by test top-1
  return config
