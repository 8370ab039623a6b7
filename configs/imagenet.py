"""ImageNet-1k (ILSVRC 2012) at 224x224 with the DeiT recipe, on lkca_s16 (vit_s16: DeiT-S).

Prepare it once from the two official tars (no public download; register at
image-net.org), then train from the prepared copy:
    python -m lkca_jax.tools.prepare --dataset imagenet2012 \\
        --manual_dir DIR_WITH_THE_TARS --data_dir TFDS_DIR
    python main.py --config configs/imagenet.py --config.dataset.data_dir=TFDS_DIR \\
        --config.dataset.download=False [--config.model=vit_s16]

The recipe is DeiT's for DeiT-S (Touvron et al. 2021, "Training data-efficient image
transformers", Table 9, and the defaults of their repository's main.py); each value says
where it comes from.

Its README trains DeiT-S as 4 processes of 256 images. Repeated augmentation is its
RASampler's: one shuffle, each index 3 times side by side (epoch_order "adjacent"), an epoch
the first N of those 3N samples (epoch_length "images"), dealt in turn to the processes;
the rows g, g + 4, ... of a global batch here are process g's batch there, and each mixes
its own with timm's Mixup (mixing.groups 4). The learning rate is set once an epoch as its
main.py steps timm's cosine (optimizer.schedule "deit_epochs"). Label smoothing is applied
to the loss where timm smooths the mixed targets: the same loss. What differs: the random
draws themselves, and no distillation (DeiT-S, not DeiT-S with the distillation token).
"""

from configs import default


def get_config():
  config = default.get_config()
  # 16x16 patches, width 384, depth 12, MLP 4x: DeiT-S's shape, built and initialised as DeiT
  # builds it (the preset's convention "deit"); vit_s16 is DeiT-S itself.
  config.model = "lkca_s16"
  config.dtype = "bfloat16"  # DeiT trains with mixed precision (torch AMP)

  config.dataset.name = "imagenet2012"
  # Decode, crop and resize on host workers, batches streamed: ~190 GB decoded fits nowhere.
  config.dataset.placement = "stream"
  # DeiT: RandomResizedCrop(224), bicubic; made on the host as torchvision makes it.
  config.dataset.stream_crop = "random_resized"
  config.dataset.stream_crop_scale = (0.08, 1.0)  # torchvision's default scale, DeiT's
  config.dataset.stream_crop_ratio = (3 / 4, 4 / 3)  # torchvision's default ratio, DeiT's
  config.dataset.eval_crop_fraction = 0.875  # DeiT --eval-crop-ratio 0.875: 256, centre 224
  config.dataset.image_size = 224  # DeiT --input-size 224
  # timm's IMAGENET_DEFAULT_MEAN / STD, which DeiT normalises with.
  config.dataset.mean = (0.485, 0.456, 0.406)
  config.dataset.std = (0.229, 0.224, 0.225)

  config.augment.flip = True  # timm's hflip 0.5
  config.augment.crop_padding = 0  # DeiT crops by RandomResizedCrop instead (see above)
  # DeiT --aa rand-m9-mstd0.5-inc1: 2 of timm's 15 increasing ops per image, each with
  # probability 0.5, at magnitude ~N(9, 0.5); bicubic, filled with the mean colour.
  config.augment.autoaugment = "rand-m9-mstd0.5-inc1"
  config.augment.random_erasing = 0.25  # DeiT --reprob 0.25, one box (--recount 1)
  config.augment.erasing_area = (0.02, 1 / 3)  # timm RandomErasing min_area, max_area
  config.augment.erasing_aspect = (0.3, 1 / 0.3)  # timm min_aspect 0.3, max 1 / 0.3
  config.augment.erasing_aspect_sampling = "log_uniform"  # timm draws log(aspect) uniformly
  config.augment.erasing_attempts = 10  # timm's
  config.augment.erasing_fill = "pixel"  # DeiT --remode pixel: N(0, 1) noise per value

  config.mixing.prob = 1.0  # DeiT --mixup-prob 1.0: every batch is mixed
  config.mixing.cutmix_prob = 0.5  # DeiT --mixup-switch-prob 0.5
  config.mixing.cutmix_alpha = 1.0  # DeiT --cutmix 1.0
  config.mixing.mixup_alpha = 0.8  # DeiT --mixup 0.8
  config.mixing.partner = "reversed"  # timm's Mixup pairs the batch with itself reversed
  config.mixing.groups = 4  # each of DeiT's 4 processes mixes its own batch (see above)
  config.label_smoothing = 0.1  # DeiT --smoothing 0.1

  config.batch_size = 1024  # DeiT Table 9: batch 1024
  # Where the devices cannot hold it: --config.microbatches=M, the same batch in M slices.
  # DeiT: lr 5e-4 x batch / 512 (its main.py scales --lr by the global batch), AdamW with
  # torch's betas (0.9, 0.999) and eps 1e-8 (--opt-eps), weight decay 0.05 (Table 9). A
  # reference, so that the rate follows a --config.batch_size given on the command line.
  config.optimizer.learning_rate = config.get_ref("batch_size").to_float() * (5e-4 / 512)
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.05
  # timm's optimizer factory, as DeiT calls it: no decay on biases, norms, the position
  # embedding and the class token.
  config.optimizer.weight_decay_on = "weights"
  config.optimizer.init_learning_rate = 1e-6  # DeiT --warmup-lr 1e-6
  config.optimizer.end_learning_rate = 1e-5  # DeiT --min-lr 1e-5, the end of its cosine
  # DeiT --model-ema, --model-ema-decay 0.99996: kept beside the model (its reported top-1 is
  # the model's), evaluated here beside it too (test_ema_top1).
  config.ema_decay = 0.99996
  config.repeats = 3  # DeiT --repeated-aug: RASampler's 3 copies
  config.epoch_order = "adjacent"  # the copies side by side, so in one step, as RASampler's
  config.epoch_length = "images"  # RASampler's epoch: the first N of the 3N samples
  config.num_epochs = 300  # DeiT --epochs 300
  config.optimizer.warmup_epochs = 5  # DeiT --warmup-epochs 5
  config.optimizer.schedule = "deit_epochs"  # timm's cosine as DeiT's main.py steps it
  # Drop path 0.1 (the presets' drop_path_rate; DeiT --drop-path 0.1, Table 9), ramped as timm
  # does from 0 in the first block to 0.1 in the last.
  config.model_overrides.drop_path_schedule = "linear"
  return config
