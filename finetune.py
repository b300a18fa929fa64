"""
finetune.py -- evaluation of a pre-trained ViT: end-to-end fine-tuning, linear probing and kNN, one file.

  finetune  MAE protocol (main_finetune.py): layer-wise lr decay, AdamW, warm-up + cosine, drop path, mixup /
            cutmix, label smoothing, RandAugment rand-m9-mstd0.5-inc1, random erasing (pixel mode); global-average-
            pool + fc_norm head (or [CLS]); top-1 every epoch
  linprobe  --protocol mae (main_linprobe.py): frozen backbone, [CLS] after the final norm -> BatchNorm1d(affine=
            False) -> Linear, LARS. --protocol ibot (iBOT / DINO eval_linear.py): normed [CLS] of the last 4 blocks
            (ViT-S and smaller) or [CLS] + mean patch token of the last block (ViT-B and larger) -> Linear, SGD.
            With --cache 1 the center-crop features are extracted once, only the head trains, and (mae) the kNN
            accuracy of the same features comes for free
  knn       DINO protocol (eval_knn.py): L2-normalised frozen features, k = 20 cosine neighbours voting with
            exp(sim / 0.07)

--checkpoint takes a nanoMIM checkpoint (mae/lut/ibot/dtm/finetune.py), an official release (MAE/LUT/DTM
'model', iBOT/DINO 'teacher'), a bare backbone state_dict, or 'none' (random init, the baseline); vit.load_vit
builds the ViT the file holds (layer scale included).

  python finetune.py --mode knn --checkpoint out/mae/checkpoint.pt       # embedded data, CPU, about a minute
  python finetune.py --mode linprobe --checkpoint out/mae/checkpoint.pt  # cached features, CPU, minutes
  python finetune.py --checkpoint out/mae/checkpoint.pt                  # fine-tuning, embedded data, CPU
  torchrun --nproc_per_node=8 finetune.py --data /path/to/imagenet --checkpoint mae_pretrain_vit_base.pth
                                                          # paper recipe: ViT-B/16, 100 ep, eff. batch 1024
  python finetune.py --help                               # every knob, with its default

Measured on the embedded shapes (ViT-tiny/8, 64 px, 5000 train / 1000 val, CPU fp32), [CLS] kNN / linear-probe
top-1: random init 16.7 / 23.0; `python mae.py` (8 epochs) 16.4 / 29.4; `python lut.py --max_steps 200` 14.8 /
21.9. The default fine-tuning of that MAE checkpoint (5 epochs, mixup / cutmix / RandAugment / erasing) stays at
chance: 11.6 (README, Evaluation).

Deliberate differences from the official evaluation code (each small; what and why):
- RandAugment: timm's 'rand-m9-mstd0.5-inc1' ops, ranges, noise and p 0.5 (the RandAugment class), called through
  torchvision's functional ops on PIL images (the same PIL calls, no timm dependency); random numbers come from
  torch's per-sample seeded RNG rather than Python's / NumPy's global ones; posterize to 0 bits (magnitude 10,
  which PIL now refuses) gives the black image older PIL gave.
- Random erasing: torchvision's RandomErasing(value='random') with timm's scale (0.02, 1/3) and aspect (0.3, 1/0.3):
  the same per-pixel N(0, 1) fill, one box, up to 10 draws, as timm's mode 'pixel'.
- Linear probe, mae: torchvision's RandomResizedCrop (10 draws, then a center crop) where MAE's util/crop.py
  draws once and clips the box (TF / BYOL style); with --cache 1 (the embedded default) the head trains on
  center-crop features with no augmentation at all, to extract features once on a CPU.
- Linear probe, ibot: one lr per run (--blr; DINO's default 1e-3): iBOT trains 45 heads at lrs {1..9} x 10^-4..10^0
  side by side and reports the best, so sweep --blr to compare with its figures; the cosine is per step, not per
  epoch (CosineAnnealingLR); RandomResizedCrop is bicubic (DINO's is bilinear); the feature recipe follows iBOT's
  run.sh by width (4 x [CLS] below 768, [CLS] + mean patch from 768).
- kNN: top-5 takes torch.topk of the class votes where DINO sorts them: they can differ only between classes with
  equal votes (e.g. several with none, when fewer than 5 classes got a vote); top-1 is the same.

Letters in shape comments: B batch, L patches, D width, C classes, N train images, M test images, F probe features.
"""
import argparse
import copy
import dataclasses
import inspect
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision import tv_tensors
from torchvision.transforms import v2

import data
import vit

METHOD = 'finetune'

# -----------------------------------------------------------------------------
# config: typed defaults, one comment each (the comment is the flag's --help); 0 / '' / -1 = picked by --data and --mode


@dataclass
class Config:
    data: str = ''             # fashion-mnist | mnist | idx:DIR | an image folder; '' = the embedded shapes, or the
    #                            small set a nanoMIM checkpoint was pre-trained on
    model: str = ''            # ViT size: mini|tiny|small|base|large|huge; '' = the checkpoint's (must match it)
    img_size: int = 0          # input resolution (position embedding interpolated); 0 = the checkpoint's, or by data
    patch_size: int = 0        # 0 = the checkpoint's; for none / pixels 8 embedded, the model's own on a folder
    mode: str = 'finetune'     # finetune|linprobe|knn
    checkpoint: str = ''       # pre-trained backbone file, or 'none' for random init (required)
    checkpoint_key: str = ''   # take the backbone from this key of the file (e.g. model_ema, student); '' = detect
    pool: str = ''             # avg|cls feature; '' = avg for finetune (MAE global_pool), cls for linprobe / knn
    layer_decay: float = 0.0   # finetune: layer-wise lr decay; 0 = 0.65 (base and smaller), 0.75 (large, huge)
    drop_path: float = -1      # finetune: stochastic depth at the last block; -1 = 0.1 (base and smaller), 0.2 L, 0.3 H
    mixup: float = 0.8         # finetune: mixup Beta alpha (0 = off)
    cutmix: float = 1.0        # finetune: cutmix Beta alpha (0 = off); with both on, each batch picks one (p 0.5)
    smoothing: float = 0.1     # finetune: label smoothing
    rand_augment: int = 9      # finetune: RandAugment magnitude, 2 ops, each p 0.5 (timm rand-m9-mstd0.5-inc1; 0 = off)
    reprob: float = 0.25       # finetune: random erasing probability (timm mode 'pixel': the box gets N(0, 1) noise)
    ema: float = 0.0           # finetune: EMA decay of the weights, evaluated beside the model (0 = off)
    cache: int = -1            # linprobe: 1 = train the head on center-crop features extracted once, 0 = augment
    protocol: str = 'mae'      # linprobe: mae (MAE main_linprobe) | ibot (iBOT eval_linear: normed [CLS] of the last 4
    #                            blocks, or [CLS] + mean patch token for base and larger; linear head, SGD, 100 epochs)
    knn_k: int = 20            # knn: neighbours
    knn_t: float = 0.07        # knn: temperature of the vote weights exp(sim / t)
    train_samples: int = 0     # use this many training images (a fixed random subset; 0 = all)
    eval_samples: int = 0      # evaluate on this many val images (a fixed random subset; 0 = all)
    epochs: int = 0            # training epochs (finetune, linprobe); the ViT-L / H recipes use 50
    batch_size: int = 0        # per process (effective batch = batch_size * accum_iter * processes)
    accum_iter: int = 1        # gradient accumulation steps (effective batch = batch_size * accum_iter * world)
    blr: float = 0.0           # base learning rate: lr = blr * effective_batch / 256 (finetune ViT-L / H: 1e-3)
    lr: float = 0.0            # absolute lr; overrides blr when > 0
    min_lr: float = -1         # end of the cosine schedule
    warmup_epochs: float = -1  # linear warm-up from 0, in epochs
    weight_decay: float = -1   # AdamW / LARS weight decay (none on biases, norms, tokens, pos_embed)
    out_dir: str = ''          # checkpoint.pt, log.jsonl, results.json; '' = out/<mode>
    resume: str = ''           # '' fresh, 'auto' = out_dir/checkpoint.pt if present, or a path
    trust_checkpoint: bool = False  # load a file that is more than data (its unpickling can run code); only if trusted
    save_every: int = 0        # optimizer steps between checkpoints; 0 = once per epoch (always at the end)
    dtype: str = ''            # bf16|fp16|fp32; '' = bf16 on CUDA, fp32 on CPU
    compile: bool = False      # torch.compile the model
    seed: int = 0              # data order, augmentation and mixing are pure functions of (seed, epoch, index)
    num_workers: int = -1      # loader workers per process, capped at the CPUs this process may use
    log_every: int = 20        # steps between log lines (the only host syncs)
    max_steps: int = 0         # stop after this many optimizer steps (0 = run all epochs); schedule unchanged
    device: str = ''           # cuda|cpu|cuda:N; '' = cuda if available


# what 0 / '' / -1 resolve to, by --data (the embedded shapes: CPU minutes; the small idx datasets: the README's
# Results protocol; an image folder: the recipe) and then by --mode (MODES).
REGIMES = {
    'embedded': dict(model='tiny', img_size=64, patch_size=8, cache=1, num_workers=2),
    'small': dict(model='mini', img_size=32, patch_size=4, cache=1, num_workers=2),
    'folder': dict(model='base', img_size=224, patch_size=0, cache=0, num_workers=10),
}
# MAE fine-tuning (ViT-B) and linear probing, DINO kNN. The embedded probe's lr 16 at batch 256 (1710 steps) moves
# the head about as far as the recipe's lr 6.4 over ~7000 steps; 0.1 underfits. The small regime is the README's
# Results protocol (results.sh): the recipe's probe on cached features, a short fine-tune without mixing.
MODES = {
    'finetune': {'embedded': dict(epochs=5, batch_size=64, blr=1e-3, min_lr=1e-6, warmup_epochs=1, weight_decay=0.05),
                 'small': dict(epochs=2, batch_size=128, blr=1e-3, min_lr=1e-6, warmup_epochs=0.2, weight_decay=0.05,
                               layer_decay=0.75, drop_path=0.0, mixup=0.0, cutmix=0.0, rand_augment=0, reprob=0.0),
                 'folder': dict(epochs=100, batch_size=128, blr=5e-4, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05)},
    'linprobe': {'embedded': dict(epochs=90, batch_size=256, blr=16.0, min_lr=0.0, warmup_epochs=10, weight_decay=0.0),
                 'small': dict(epochs=90, batch_size=2048, blr=0.1, min_lr=0.0, warmup_epochs=10, weight_decay=0.0),
                 'folder': dict(epochs=90, batch_size=2048, blr=0.1, min_lr=0.0, warmup_epochs=10, weight_decay=0.0)},
    'knn': {'embedded': dict(batch_size=256), 'small': dict(batch_size=256), 'folder': dict(batch_size=256)},
}
BIG = {'finetune': dict(epochs=50, blr=1e-3), 'linprobe': dict(epochs=50), 'knn': {}}  # the ViT-L / H recipes
# --protocol ibot (embedded, recipe): iBOT / DINO eval_linear.py, SGD lr = blr * batch / 256 (DINO's default blr 1e-3;
# iBOT reports the best of a sweep over 45 lrs), cosine to 0, no warm-up, no weight decay, 128 per GPU x 8. Embedded:
# on random-init features top-1 is flat in blr (22.7 / 22.5 / 22.4 at 0.2 / 2 / 20), 2 sits in the middle
IBOT_PROBE = {'embedded': dict(epochs=90, batch_size=256, blr=2.0, min_lr=0.0, warmup_epochs=0, weight_decay=0.0),
              'small': dict(epochs=90, batch_size=256, blr=2.0, min_lr=0.0, warmup_epochs=0, weight_decay=0.0),
              'folder': dict(epochs=100, batch_size=128, blr=1e-3, min_lr=0.0, warmup_epochs=0, weight_decay=0.0)}
ARCH_KEYS = ('mode', 'model', 'img_size', 'patch_size', 'pool', 'cache', 'protocol')  # must match on resume


def field_help(cls):
    """{field name: its '# comment'} from the dataclass source (a comment may go on over '#' lines below it), so the
    comment is the one place a knob is described."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # no source at hand (frozen app): flags keep their defaults as help
        return {}
    out, name = {}, None
    for line in lines:
        code, sep, comment = line.partition('# ')
        if sep and not code.strip() and name:  # a continuation line of the previous field's comment
            out[name] += ' ' + comment.strip()
            continue
        name = code.split(':')[0].strip() if sep and ':' in code and '=' in code else None
        if name:
            out[name] = comment.strip()
    return out


def get_config(argv=None):
    """argparse from Config (the field comments are the help; unknown flags are rejected), then the defaults left
    at 0 / '' / -1 are filled from the regime of --data (REGIMES) and the mode (MODES)."""
    def boolean(s):
        if s.lower() not in ('1', 'true', 'yes', 'on', '0', 'false', 'no', 'off'):
            raise argparse.ArgumentTypeError(f'expected true or false, got {s!r}')
        return s.lower() in ('1', 'true', 'yes', 'on')
    helps = field_help(Config)
    p = argparse.ArgumentParser(description=__doc__, epilog=data.REGIME_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        picked = [f'{r} {v[f.name]!r}' for r, v in REGIMES.items() if f.name in v]
        picked += [f'{m} {r} {v[f.name]!r}' for m, by in MODES.items() for r, v in by.items() if f.name in v]
        default = f'default {f.default!r}' + (f' = picked by --data and --mode: {"; ".join(picked)}' if picked else '')
        kind = dict(type=boolean, nargs='?', const=True, metavar='BOOL') if f.type is bool else dict(type=f.type)
        p.add_argument(f'--{f.name}', default=f.default, help=f'{helps.get(f.name, "")} ({default})'.replace('%', '%%'),
                       **kind)  # a bare --compile means --compile true
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.mode not in MODES:
        p.error(f'--mode must be one of {", ".join(MODES)}')
    if not cfg.checkpoint:
        p.error('--checkpoint is required: a checkpoint file (nanoMIM, official MAE / iBOT / LUT / DTM, bare '
                'state_dict), none for random init, or pixels (raw-pixel features; knn and cached linprobe)')
    arch, trained = {}, {}  # the ViT the checkpoint holds, and the config of a nanoMIM checkpoint
    if cfg.checkpoint not in ('none', 'pixels'):
        try:
            arch, trained = vit.pretrained_arch(cfg.checkpoint, cfg.checkpoint_key, cfg.trust_checkpoint)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f'error: {e}')
    cfg.data, data_note = data.data_from_checkpoint(cfg.data, trained.get('data'))
    cfg.notes = [data_note] if data_note else []  # printed under the first line (not a flag)
    regime = data.regime(cfg.data)
    model = cfg.model or arch.get('model') or REGIMES[regime]['model']
    defaults = dict(layer_decay=0.75 if model in ('large', 'huge') else 0.65,
                    drop_path={'large': 0.2, 'huge': 0.3}.get(model, 0.1), out_dir=f'out/{cfg.mode}',
                    pool='avg' if cfg.mode == 'finetune' else 'cls')
    defaults.update(**REGIMES[regime], **MODES[cfg.mode][regime])
    if arch:  # the checkpoint's ViT at the resolution it was trained at, unless --model / --patch_size / --img_size
        defaults.update(model=model, patch_size=arch['patch_size'], img_size=arch['img_size'])
    if regime == 'folder' and model in ('large', 'huge'):
        defaults.update(BIG[cfg.mode])
    if cfg.mode == 'linprobe' and cfg.protocol == 'ibot':
        defaults.update(IBOT_PROBE[regime])
    for k, v in defaults.items():
        if getattr(cfg, k) == getattr(Config, k):  # left at its default: fill it
            setattr(cfg, k, v)
    cfg.num_workers = data.default_workers(cfg.num_workers)
    if cfg.patch_size == 0:
        cfg.patch_size = vit.SIZES[cfg.model][3] if cfg.model in vit.SIZES else 16
    if cfg.model not in vit.SIZES:
        p.error(f'--model must be one of {", ".join(vit.SIZES)}')
    if cfg.img_size % cfg.patch_size:
        p.error(f'--img_size {cfg.img_size} is not divisible by --patch_size {cfg.patch_size}')
    if cfg.pool not in ('avg', 'cls'):
        p.error('--pool must be avg or cls')
    if cfg.cache not in (0, 1):
        p.error('--cache must be 0 or 1')
    if cfg.protocol not in ('mae', 'ibot'):
        p.error('--protocol must be mae or ibot')
    if cfg.checkpoint == 'pixels' and not (cfg.mode == 'knn' or (cfg.mode == 'linprobe' and cfg.cache == 1)):
        p.error('--checkpoint pixels works with --mode knn and --mode linprobe --cache 1 (features extracted once)')
    if cfg.knn_k < 1 or cfg.knn_t <= 0:
        p.error('--knn_k must be >= 1 and --knn_t > 0')
    if min(cfg.mixup, cfg.cutmix, cfg.smoothing, cfg.reprob, cfg.ema, cfg.drop_path) < 0 or cfg.ema >= 1:
        p.error('--mixup, --cutmix, --smoothing, --reprob, --drop_path must be >= 0 and --ema in [0, 1)')
    if cfg.dtype not in ('', 'bf16', 'fp16', 'fp32'):
        p.error('--dtype must be bf16, fp16 or fp32')
    return cfg

# -----------------------------------------------------------------------------
# recipe: training augmentation (timm's create_transform as MAE's main_finetune.py calls it)

# RandAugment as timm's 'rand-m9-mstd0.5-inc1' (MAE / BEiT / iBOT / DTM fine-tuning), with torchvision's functional ops
# on PIL images, which call the same PIL code as timm's auto_augment.py. timm: magnitude m of _LEVEL_DENOM = 10 scales
# each op's range, drawn per op as N(m, 0.5) clipped to [0, 10]; each of the 2 ops (drawn with replacement from the
# 15 'increasing' ops) is applied with probability 0.5; signed ops take a random sign; geometric ops resample
# bicubic (MAE passes interpolation='bicubic') and fill with the ImageNet mean colour (timm img_mean).
RA_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing', 'SolarizeAdd',
          'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY',
          'TranslateXRel', 'TranslateYRel')  # timm _RAND_INCREASING_TRANSFORMS
RA_SIGNED = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel', 'ColorIncreasing', 'ContrastIncreasing',
             'BrightnessIncreasing', 'SharpnessIncreasing')  # timm _randomly_negate


def ra_level(name, m):
    """timm's level_to_arg at magnitude m in [0, 10], before the random sign: degrees (Rotate), shear factor,
    fraction of the side (Translate*Rel), bits kept (Posterize), threshold (Solarize), added value (SolarizeAdd),
    or the distance of the enhance factor from 1 (the factor is max(0.1, 1 +- level)). None for the plain ops."""
    f = m / 10.0
    return {'Rotate': 30.0 * f, 'ShearX': 0.3 * f, 'ShearY': 0.3 * f, 'TranslateXRel': 0.45 * f,
            'TranslateYRel': 0.45 * f, 'PosterizeIncreasing': 4 - int(f * 4), 'SolarizeIncreasing': 256 - int(f * 256),
            'SolarizeAdd': int(f * 110), 'ColorIncreasing': 0.9 * f, 'ContrastIncreasing': 0.9 * f,
            'BrightnessIncreasing': 0.9 * f, 'SharpnessIncreasing': 0.9 * f}.get(name)


def ra_apply(img, name, level, fill=(124, 116, 104)):
    """One RandAugment op on a PIL image with its signed level (ra_level, sign applied), as timm's op functions."""
    F, bicubic = v2.functional, v2.InterpolationMode.BICUBIC
    if name in ('AutoContrast', 'Equalize', 'Invert'):
        return {'AutoContrast': F.autocontrast, 'Equalize': F.equalize, 'Invert': F.invert}[name](img)
    if name == 'Rotate':
        return F.rotate(img, level, interpolation=bicubic, fill=list(fill))
    if name in ('ShearX', 'ShearY'):  # PIL affine (1, s, 0, 0, 1, 0) about the top-left corner
        a = math.degrees(math.atan(level))
        return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[a, 0.0] if name == 'ShearX' else [0.0, a],
                        center=[0, 0], interpolation=bicubic, fill=list(fill))
    if name in ('TranslateXRel', 'TranslateYRel'):
        t = [level * img.size[0], 0.0] if name == 'TranslateXRel' else [0.0, level * img.size[1]]
        return F.affine(img, angle=0.0, translate=t, scale=1.0, shear=[0.0, 0.0], interpolation=bicubic,
                        fill=list(fill))
    if name == 'PosterizeIncreasing':
        if level <= 0:  # keep 0 bits (magnitude 10): black, what PIL gave before it refused bits=0
            return Image.new(img.mode, img.size)
        return img if level >= 8 else F.posterize(img, level)
    if name == 'SolarizeIncreasing':
        return F.solarize(img, level)
    if name == 'SolarizeAdd':  # pixels below 128 get `level` added (saturating)
        return img.point([min(255, i + level) if i < 128 else i for i in range(256)] * len(img.getbands()))
    factor = max(0.1, 1.0 + level)
    return {'ColorIncreasing': F.adjust_saturation, 'ContrastIncreasing': F.adjust_contrast,
            'BrightnessIncreasing': F.adjust_brightness, 'SharpnessIncreasing': F.adjust_sharpness}[name](img, factor)


class RandAugment:
    """timm rand-m{magnitude}-mstd{magnitude_std}-inc1 with num_ops ops, each applied with probability `prob`.
    uint8 image tensor (3, H, W) in and out; randomness from torch's RNG (seeded per sample by Seeded)."""

    def __init__(self, num_ops=2, magnitude=9, magnitude_std=0.5, prob=0.5):
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = num_ops, magnitude, magnitude_std, prob

    def __call__(self, img):
        pil = v2.functional.to_pil_image(img)
        for _ in range(self.num_ops):
            name = RA_OPS[int(torch.randint(len(RA_OPS), ()))]  # with replacement, as np.random.choice in timm
            if torch.rand(()).item() > self.prob:
                continue
            m = self.magnitude + (self.magnitude_std * torch.randn(()).item() if self.magnitude_std > 0 else 0.0)
            level = ra_level(name, min(max(m, 0.0), 10.0))
            if name in RA_SIGNED and torch.rand(()).item() > 0.5:
                level = -level
            pil = ra_apply(pil, name, level)
        return tv_tensors.Image(v2.functional.pil_to_tensor(pil))


def finetune_transform(img_size, rand_augment=(2, 9), reprob=0.25):
    """MAE fine-tuning train transform (timm create_transform as main_finetune.py calls it): RRC (0.08, 1) bicubic +
    flip + RandAugment rand-m9-mstd0.5-inc1 (n ops, magnitude m) + normalize + random erasing (p reprob, mode
    'pixel': the box is filled with per-pixel N(0, 1) noise in normalized units, scale (0.02, 1/3), log-uniform
    aspect (0.3, 1/0.3), one box). Mixup/CutMix act on batches (v2.MixUp / v2.CutMix in finetune.py)."""
    t = [v2.ToImage(), v2.RandomResizedCrop(img_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
         v2.RandomHorizontalFlip()]
    if rand_augment:
        t.append(RandAugment(num_ops=rand_augment[0], magnitude=rand_augment[1]))
    t += data._to_tensor()[1:]
    if reprob > 0:
        t.append(v2.RandomErasing(p=reprob, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value='random'))
    return v2.Compose(t)


# -----------------------------------------------------------------------------
# model: the pre-trained ViT with a classifier (finetune), a frozen ViT with a BN + linear head (linprobe)


def build_backbone(cfg, num_classes, verbose=True):
    """The ViT to evaluate: the one the checkpoint holds (vit.load_vit: its width, depth, heads, patch and layer
    scale; get_config took --model / --patch_size / --img_size from it unless given, and given ones must match), or
    a random init (none, pixels) from the current seed.
    Fine-tuning gives it a classifier head, pooling (avg: MAE global_pool + fc_norm) and drop path."""
    finetuning = cfg.mode == 'finetune'
    kw = dict(img_size=cfg.img_size, num_classes=num_classes if finetuning else 0,
              global_pool=('avg' if cfg.pool == 'avg' else 'token') if finetuning else 'token',
              drop_path_rate=cfg.drop_path if finetuning else 0.0)
    if cfg.checkpoint in ('none', 'pixels'):
        if verbose:
            print('raw pixels (--checkpoint pixels)' if cfg.checkpoint == 'pixels'
                  else 'random init (--checkpoint none)')
        return vit.vit(cfg.model, patch_size=cfg.patch_size, **kw)
    try:
        return vit.load_vit(cfg.checkpoint, cfg.checkpoint_key, model=cfg.model, patch_size=cfg.patch_size,
                            verbose=verbose, trust=cfg.trust_checkpoint, **kw)[0]
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'error: {vit.as_flags(e)}')


def rank0():
    """True in the process that prints (rank 0, or the only process)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def pool_tokens(t, pool):
    """(B, 1+L, D) tokens after the final norm -> (B, D): [CLS] ('cls') or the mean of the patch tokens ('avg')."""
    return t[:, 0] if pool == 'cls' else t[:, 1:].mean(dim=1)


def probe_features(backbone, x, pool, protocol='mae'):
    """Frozen features (B, F). mae (MAE main_linprobe, DINO eval_knn): the pooled tokens after the final norm, F = D.
    ibot (iBOT / DINO eval_linear.py as iBOT's run.sh sets it): the final norm applied to each of the last 4 blocks'
    outputs and their [CLS] concatenated (n_last_blocks 4, avgpool 0: ViT-S and smaller, F = 4D), or [CLS] and the
    mean patch token of the last block (n_last_blocks 1, avgpool 2: ViT-B and larger, F = 2D)."""
    if protocol == 'mae':
        return pool_tokens(backbone.forward_features(x), pool)
    depth, n = len(backbone.blocks), 1 if backbone.embed_dim >= 768 else 4
    outs = [backbone.norm(t) for t in backbone.forward_intermediates(x, range(depth - n + 1, depth + 1))]
    return torch.cat([t[:, 0] for t in outs] + ([outs[-1][:, 1:].mean(dim=1)] if n == 1 else []), dim=-1)


def probe_dim(backbone, protocol):
    D = backbone.embed_dim
    return D if protocol == 'mae' else 2 * D if D >= 768 else 4 * D


class Probe(nn.Module):
    """Linear probe on a frozen backbone. mae (MAE main_linprobe): pooled feature (B, D) -> BatchNorm1d(affine=False,
    eps 1e-6) -> Linear(D, C), init trunc normal std 0.01. ibot (DINO / iBOT LinearClassifier): probe_features (B, F)
    -> Linear(F, C), init normal std 0.01, no BatchNorm. backbone=None: the input is the cached feature."""

    def __init__(self, backbone, dim, num_classes, pool, protocol='mae'):
        super().__init__()
        self.backbone, self.pool, self.protocol = backbone, pool, protocol
        linear = nn.Linear(dim, num_classes)
        if protocol == 'mae':
            self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)
            nn.init.trunc_normal_(linear.weight, std=0.01)
        else:
            self.head = nn.Sequential(linear)
            nn.init.normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)

    def forward(self, x):
        if self.backbone is not None:
            with torch.no_grad():
                x = probe_features(self.backbone, x, self.pool, self.protocol)  # (B, F)
        return self.head(x.float())  # (B, C)


class Features(torch.utils.data.Dataset):
    """Cached features (N, D) and labels (N,) as a dataset keyed like data.Seeded ((index, seed) from the sampler)."""

    def __init__(self, feats, labels):
        self.feats, self.labels = feats, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        return self.feats[i], self.labels[i]


def extract_features(backbone, loader, pool, device, autocast, dim, protocol='mae', desc='features'):
    """Frozen features (probe_features) of this rank's share of the loader, in sampler order: (n_r, dim) float32,
    labels (n_r,). backbone None: the normalised image itself, flattened (dim = 3 S S), for the raw-pixel rows.
    Rank 0 prints a progress line at most every 10 s (data.embed, which the pre-training kNN monitor runs too)."""
    if backbone is not None:
        backbone.eval()
    features = None if backbone is None else (lambda x: probe_features(backbone, x, pool, protocol))
    return data.embed(features, loader, device, autocast, dim, desc, rank0())


# -----------------------------------------------------------------------------
# loss, accuracy and kNN


def smooth_targets(y, num_classes, smoothing):
    """Labels (B,) or mixed soft labels (B, C) -> (B, C) targets y (1 - s) + s / C (label smoothing)."""
    if y.ndim == 1:
        y = F.one_hot(y, num_classes).float()
    return y.float() * (1.0 - smoothing) + smoothing / num_classes


def soft_target_ce(logits, target):
    """Cross-entropy against soft targets (B, C), mean over the batch, in fp32."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def batch_mixer(mixup, cutmix, num_classes):
    """Mixup / CutMix on whole batches (torchvision v2): (imgs, labels (B,)) -> (mixed imgs, soft labels (B, C)).
    With both on, each batch takes one of the two with probability 0.5 (timm switch_prob 0.5). None if both off."""
    ops = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
          ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    return v2.RandomChoice(ops) if len(ops) == 2 else (ops[0] if ops else None)


@torch.no_grad()
def evaluate(model, loader, device, autocast, ddp):
    """Top-1 / top-5 (%) and the number of images: every rank counts its own share (the evaluation sampler gives
    each image to exactly one rank, no padding) and the counts are summed. Returns (acc1, acc5, n)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, device=device)  # top-1 hits, top-5 hits, images
    prog = data.Progress('eval', len(loader.sampler), enabled=rank0())
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            logits = model(x)  # (B, C)
        counts += data.count_correct(logits.float(), y)
        prog.update(len(y))
    prog.close()
    if ddp:
        dist.all_reduce(counts)
    model.train(was_training)
    c1, c5, n = counts.tolist()
    return 100.0 * c1 / max(n, 1), 100.0 * c5 / max(n, 1), int(n)

# -----------------------------------------------------------------------------
# optimizer and schedules


def layer_id(name, depth):
    """Layer index for lr decay: 0 = patch embed, [CLS], pos_embed; i + 1 = block i; depth + 1 = norms and head."""
    if name.startswith(('cls_token', 'pos_embed', 'patch_embed.', 'mask_token')):
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return depth + 1


def param_groups(model, weight_decay, layer_decay=1.0):
    """Groups with layer-wise lr decay (MAE util/lr_decay.py): layer i gets lr_scale = decay^(depth + 1 - i); no
    weight decay on biases, norms (1-D params), tokens and position embeddings. Frozen parameters are left out."""
    depth = len(model.blocks) if hasattr(model, 'blocks') else 0
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or n.endswith(('cls_token', 'mask_token', 'pos_embed'))
        i = layer_id(n, depth)
        g = groups.setdefault((i, skip), {'params': [], 'names': [], 'weight_decay': 0.0 if skip else weight_decay,
                                           'lr_scale': layer_decay ** (depth + 1 - i)})
        g['params'].append(p)
        g['names'].append(n)
    return [groups[k] for k in sorted(groups)]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a per-tensor trust ratio (You et al. 2017), as in MAE's linear probe: for weight
    matrices the update d = g + wd * w is rescaled to trust * |w| / |d| (so the step is relative to the weight's
    size, whatever the batch); biases take the plain momentum update."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g['params']:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g['weight_decay'])
                    w_norm, d_norm = torch.norm(p), torch.norm(d)
                    ratio = torch.where((w_norm > 0) & (d_norm > 0), g['trust_coefficient'] * w_norm / d_norm, 1.0)
                    d = d * ratio
                mu = self.state[p].setdefault('mu', torch.zeros_like(p))
                mu.mul_(g['momentum']).add_(d)
                p.add_(mu, alpha=-g['lr'])


def lr_at(step, base_lr, min_lr, warmup_steps, total_steps):
    """Per-step linear warm-up from 0, then half-cycle cosine to min_lr (MAE util/lr_sched.py)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


@torch.no_grad()
def ema_update(teacher, student, m):
    """teacher <- m teacher + (1 - m) student over the parameters and floating buffers (BN running statistics) the
    two share by name (official names_common), one fused multi-tensor lerp; integer buffers (BN
    num_batches_tracked) are copied. m = 0 copies, m = 1 keeps."""
    s = {**dict(student.named_parameters()), **dict(student.named_buffers())}
    pairs = [(t, s[n]) for n, t in [*teacher.named_parameters(), *teacher.named_buffers()] if n in s]
    floats = [(t, o) for t, o in pairs if t.is_floating_point()]
    torch._foreach_lerp_([t for t, _ in floats], [o for _, o in floats], 1.0 - m)
    for t, o in pairs:
        if not t.is_floating_point():
            t.copy_(o)

# -----------------------------------------------------------------------------
# distributed, precision, checkpoints (the same block in every nanoMIM script)


def resolve_device(flag, local_rank, ddp, cuda_available):
    """--device -> a device string with an index for CUDA ('cuda' -> 'cuda:LOCAL_RANK'; under torchrun every
    process takes its own GPU), without touching CUDA. Another value than cuda, cuda:N or cpu, or CUDA asked for
    where there is none, stops with one line."""
    kind, colon, index = flag.partition(':')
    if flag not in ('', 'cpu', 'cuda') and not (kind == 'cuda' and colon and index.isdigit()):
        sys.exit(f'error: --device must be cuda, cuda:N or cpu, got {flag!r}')
    if kind == 'cuda' and not cuda_available:
        sys.exit(f'error: --device {flag}: CUDA is not available here (torch {torch.__version__}, '
                 f'{"built without CUDA" if torch.version.cuda is None else "no GPU visible"}); use --device cpu')
    device = flag or ('cuda' if cuda_available else 'cpu')
    if device.startswith('cuda') and (ddp or device == 'cuda'):
        device = f'cuda:{local_rank}'
    return device


def setup_distributed(cfg):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; plain `python` runs one process.
    Returns (ddp, rank, local_rank, world, device)."""
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, local_rank, world = (int(os.environ['RANK']), int(os.environ['LOCAL_RANK']),
                               int(os.environ['WORLD_SIZE'])) if ddp else (0, 0, 1)
    device = resolve_device(cfg.device, local_rank, ddp, torch.cuda.is_available())
    if device.startswith('cuda'):
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if ddp:
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    torch.manual_seed(cfg.seed + rank)
    return ddp, rank, local_rank, world, device


def setup_precision(cfg, device_type):
    """bf16 autocast by default on CUDA, fp16 autocast with a GradScaler, fp32 on CPU.
    Returns (dtype name, autocast context, scaler)."""
    dtype = cfg.dtype or ('bf16' if device_type == 'cuda' else 'fp32')
    ptdtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}[dtype]
    autocast = nullcontext() if dtype == 'fp32' else torch.autocast(device_type, dtype=ptdtype)
    return dtype, autocast, torch.amp.GradScaler(device_type, enabled=dtype == 'fp16')


def step_seed(seed, rank, step):
    """The seed of torch's RNG inside optimizer step `step` (drop path, in-step draws): a function of (seed, rank,
    step), set after the batch is fetched, so resume == uninterrupted and DDP ranks draw differently."""
    return seed + 1_000_003 * rank + 7919 * step


def save_checkpoint(path, state):
    """Atomic: write a temp file in the same folder, fsync, rename; a killed process never leaves a torn file."""
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, cfg):
    """Load a checkpoint to resume from; refuses another method's or another architecture's checkpoint."""
    try:
        ckpt = vit.safe_load(path, cfg.trust_checkpoint)  # weights only, unless --trust_checkpoint
    except ValueError as e:
        sys.exit(f'error: {e}')
    if ckpt.get('method') != METHOD:
        sys.exit(f'error: {path} is {vit.checkpoint_kind(ckpt.get("method"))}, not {vit.checkpoint_kind(METHOD)}')
    old = ckpt['config']
    diff = [f'{k}={old.get(k)} (now {getattr(cfg, k)})' for k in ARCH_KEYS if old.get(k) != getattr(cfg, k)]
    if diff:
        sys.exit(f'error: {path} was trained with ' + ', '.join(diff))
    return ckpt


def restore(ckpt, stateful):
    """Load every object of `stateful` ({name: object with load_state_dict}) from ckpt[name]. A GradScaler saved
    disabled (a bf16 / fp32 run) holds nothing and is skipped, so a run may resume with another --dtype."""
    for name, obj in stateful.items():
        if isinstance(obj, torch.amp.GradScaler) and not ckpt[name]:
            continue
        obj.load_state_dict(ckpt[name])


def log_stats(stats_sum, names, rec, ddp, master, out_dir):
    """Average the device-side sums of the last steps over processes (the only host sync), stop on a non-finite
    value before anything is saved, print one line and append it to log.jsonl. rec: step, epoch, n (steps summed),
    schedules, img/s, eta. Returns the record."""
    if ddp:
        dist.all_reduce(stats_sum, op=dist.ReduceOp.AVG)
    vals = (stats_sum / rec.pop('n')).tolist()
    rec = {k: v for k, v in rec.items() if isinstance(v, (int, float))}  # scalars only (DTM's morph lists stay out)
    if not all(math.isfinite(v) for v in vals):
        print(f'error: non-finite loss by step {rec["step"]} ({dict(zip(names, vals))}); nothing saved',
              file=sys.stderr)
        sys.exit(2)
    rec = {**rec, **dict(zip(names, vals))}
    if master:
        keys = list(names) + [k for k in rec if k not in (*names, 'step', 'end_step', 'epoch', 'img_per_s', 'eta_min')]
        print(f"step {rec['step']}/{rec['end_step']} ep {rec['epoch']:.2f} " +
              ' '.join(f'{k} {rec[k]:.4g}' for k in keys) +
              f" {rec['img_per_s']:.0f} img/s eta {rec['eta_min']:.1f} min", flush=True)
        with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
            f.write(json.dumps(rec) + '\n')
    return rec

# -----------------------------------------------------------------------------
# the three modes and the training loop they share (finetune, linprobe)


def eval_transform(img_size):
    """Resize + center crop (MAE build_transform): crop ratio 224/256 up to 224 px, 1.0 above."""
    return data.eval_transform(img_size, 0.875 if img_size <= 224 else 1.0)


def cached_features(cfg, env, backbone, dataset, val_set):
    """Frozen features of center crops, extracted once, each rank its share: all train rows (N, F) and labels on
    every rank, this rank's val rows (M_r, F) and labels."""
    pixels = cfg.checkpoint == 'pixels'  # raw-pixel features instead of a backbone: the reference rows
    dim = 3 * cfg.img_size ** 2 if pixels else probe_dim(backbone, cfg.protocol)

    def features(ds, desc):
        loader, _ = data.make_loader(ds, cfg.batch_size, env.world, env.rank, cfg.seed, cfg.num_workers, train=False)
        return extract_features(None if pixels else backbone, loader, cfg.pool, env.device, env.autocast, dim,
                                cfg.protocol, desc)
    t_feat = time.time()
    train_f, train_y = (data.gather_rows(t, len(dataset), env.world) for t in features(dataset, 'train features'))
    val_f, val_y = features(val_set, 'val features')
    if env.master:
        print(f'features: {len(dataset)} train, {len(val_set)} val images, dim {train_f.shape[1]}, '
              f'{time.time() - t_feat:.1f} s')
    return train_f, train_y, val_f, val_y


def knn_eval(cfg, env, train_f, train_y, val_f, val_y, num_classes):
    """kNN top-1 / top-5 of this rank's val rows against all train rows, summed over ranks; rank 0 prints."""
    counts = data.knn_counts(train_f, train_y, val_f, val_y, num_classes, cfg.knn_k, cfg.knn_t)
    if env.ddp:
        dist.all_reduce(counts)
    c1, c5, n = counts.tolist()
    knn = {'k': cfg.knn_k, 't': cfg.knn_t, 'knn_acc1': 100 * c1 / max(n, 1), 'knn_acc5': 100 * c5 / max(n, 1),
           'n': int(n), 'n_train': len(train_y)}
    if env.master:
        print(f"knn k={cfg.knn_k} t={cfg.knn_t} {cfg.pool}: top-1 {knn['knn_acc1']:.2f} top-5 {knn['knn_acc5']:.2f} "
              f"({knn['n']} val images, {len(train_y)} train)")
    return knn


def run_knn(cfg, env, backbone, base, val_set, num_classes):
    """--mode knn (DINO eval_knn): L2-normalised frozen features of center crops, weighted k-NN vote."""
    dataset = data.Seeded(base, eval_transform(cfg.img_size))
    knn = knn_eval(cfg, env, *cached_features(cfg, env, backbone, dataset, val_set), num_classes)
    if env.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, 'results.json'), 'w') as f:
            json.dump({'mode': 'knn', 'checkpoint': cfg.checkpoint, 'pool': cfg.pool, 'acc1': knn['knn_acc1'],
                       'acc5': knn['knn_acc5'], **knn}, f)
        print(f"done: kNN top-1 {knn['knn_acc1']:.2f}; wrote {cfg.out_dir}/results.json")


def run_linprobe(cfg, env, backbone, base, val_set, num_classes):
    """--mode linprobe: a linear head on the frozen backbone. mae: MAE main_linprobe (BatchNorm + linear, LARS, RRC +
    flip); ibot: DINO / iBOT eval_linear (linear on probe_features, SGD momentum 0.9). With --cache 1 the features
    of center crops are extracted once and the head trains on them (the kNN accuracy of the same features, mae
    protocol, comes for free)."""
    backbone.requires_grad_(False)
    knn = None
    if cfg.cache:
        dataset = data.Seeded(base, eval_transform(cfg.img_size))
        train_f, train_y, val_f, val_y = cached_features(cfg, env, backbone, dataset, val_set)
        if cfg.protocol == 'mae':
            knn = knn_eval(cfg, env, train_f, train_y, val_f, val_y, num_classes)
        n_val = len(val_set)
        dataset = Features(train_f.cpu(), train_y.cpu())
        val_set = Features(data.gather_rows(val_f, n_val, env.world).cpu(),
                           data.gather_rows(val_y, n_val, env.world).cpu())
        model = Probe(None, train_f.shape[1], num_classes, cfg.pool, cfg.protocol).to(env.device)
    else:
        dataset = data.Seeded(base, data.mae_transform(cfg.img_size, scale=(0.08, 1.0)))  # RandomResizedCrop + flip
        model = Probe(backbone, probe_dim(backbone, cfg.protocol), num_classes, cfg.pool, cfg.protocol).to(env.device)
    if cfg.protocol == 'mae':
        optimizer = LARS(param_groups(model, cfg.weight_decay))
    else:
        optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=0.0, momentum=0.9)
    train(cfg, env, model, optimizer, backbone, dataset, val_set, num_classes, knn=knn)


def run_finetune(cfg, env, backbone, base, val_set, num_classes):
    """--mode finetune (MAE main_finetune): the whole ViT with a fresh head, layer-wise lr decay, AdamW, RandAugment,
    random erasing, mixup / cutmix, label smoothing."""
    ra = (2, cfg.rand_augment) if cfg.rand_augment else None
    dataset = data.Seeded(base, finetune_transform(cfg.img_size, ra, cfg.reprob))
    model = backbone
    model.pos_embed.requires_grad_(True)  # trainable from the pre-trained values, as in timm / MAE fine-tuning
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.layer_decay), betas=(0.9, 0.999),
                                  fused=env.device_type == 'cuda', foreach=env.device_type != 'cuda')
    train(cfg, env, model, optimizer, backbone, dataset, val_set, num_classes,
          mixer=batch_mixer(cfg.mixup, cfg.cutmix, num_classes), smoothing=cfg.smoothing)


STATS = ('loss', 'grad_norm')  # what train_step returns, summed on the device between log lines


def train_step(fwd, model, ema, optimizer, scaler, autocast, batches, sched, cfg, num_classes, mixer=None,
               smoothing=0.0):
    """One optimizer step of finetune / linprobe: on each micro-batch mixup / cutmix (finetune), label smoothing,
    soft-target cross-entropy, backward (gradients accumulate; under DDP all-reduced on the last micro-batch only);
    then the grad norm, the optimizer step (each group's lr is sched['lr'] times its layer-decay lr_scale), the
    scaler update and the weights' EMA (--ema). batches: accum_iter x (x (B, 3, H, W) or cached features (B, F),
    y (B,) labels) on the device. Returns STATS (on the device, no sync)."""
    for g in optimizer.param_groups:
        g['lr'] = sched['lr'] * g['lr_scale']
    loss_sum = 0.0
    for i, (x, y) in enumerate(batches):
        if mixer is not None:
            x, y = mixer(x, y)  # (B, 3, H, W) mixed pairs, (B, C) soft labels
        target = smooth_targets(y, num_classes, smoothing)  # (B, C)
        ddp = getattr(fwd, '_orig_mod', fwd)  # the DDP module, also inside torch.compile's wrapper
        sync = ddp.no_sync() if isinstance(ddp, DDP) and i < len(batches) - 1 else nullcontext()
        with sync:
            with autocast:
                loss = soft_target_ce(fwd(x), target)
            scaler.scale(loss / len(batches)).backward()
        loss_sum = loss_sum + loss.detach() / len(batches)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float('inf'))  # measured, not clipped (recipe)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema_update(ema, model, cfg.ema)
    return torch.stack([loss_sum, grad_norm.float()])


def train(cfg, env, model, optimizer, backbone, dataset, val_set, num_classes, mixer=None, smoothing=0.0, knn=None):
    """The training loop of finetune and linprobe: per-step lr (warm-up + cosine, times each group's lr_scale),
    evaluation at every epoch end and at the last step, checkpoints, resume, results.json."""
    ddp, rank, local_rank, world, master = env.ddp, env.rank, env.local_rank, env.world, env.master
    device, device_type, dtype, autocast, scaler = env.device, env.device_type, env.dtype, env.autocast, env.scaler
    workers = 0 if isinstance(dataset, Features) else cfg.num_workers
    try:
        loader, sampler = data.make_loader(dataset, cfg.batch_size, world, rank, cfg.seed, workers)
    except ValueError as e:
        sys.exit(f'error: {e} (the {data.regime(cfg.data)} regime picks {picked(cfg, "batch_size")} for '
                 f'--mode {cfg.mode})')
    val_loader, _ = data.make_loader(val_set, cfg.batch_size, world, rank, cfg.seed, workers, train=False)
    steps_per_epoch, total_steps, end_step, eff_batch, base_lr, warmup_steps = plan(cfg, len(dataset), world)
    assert steps_per_epoch == sampler.batches_per_epoch() // cfg.accum_iter
    if steps_per_epoch == 0:
        sys.exit(f'error: {len(dataset)} training images give no optimizer step per epoch at batch {cfg.batch_size} '
                 f'x accum_iter {cfg.accum_iter} x {world} processes')
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema > 0 else None
    step, best = 0, {'acc1': 0.0, 'ema_acc1': 0.0}
    resume = os.path.join(cfg.out_dir, 'checkpoint.pt') if cfg.resume == 'auto' else cfg.resume
    if resume and not (cfg.resume == 'auto' and not os.path.exists(resume)):
        ckpt = load_checkpoint(resume, cfg)
        restore(ckpt, {'model': model, 'optimizer': optimizer, 'scaler': scaler})
        step, best = ckpt['step'], ckpt['best']
        if ema is not None and ckpt.get('ema') is not None:
            ema.load_state_dict(ckpt['ema'])
        if master:
            print(f'resumed from {resume} at step {step}')
        del ckpt
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        print(f'backbone {vit.count_params(backbone) / 1e6:.2f}M params, '
              f'trainable {vit.count_params(model, True) / 1e6:.3f}M, '
              f'{len(dataset)} train / {len(val_set)} val images, {num_classes} classes, {steps_per_epoch} steps/epoch')
    fwd = torch.compile(model) if cfg.compile else model
    if ddp:  # buffers (probe BN statistics) broadcast from rank 0 at every forward
        fwd = DDP(fwd, device_ids=[local_rank] if device_type == 'cuda' else None)

    def run_eval():
        """Accuracy of the model (and its EMA) on the whole val set; updates `best`; rank 0 logs."""
        if ddp:  # one set of BN running statistics on every rank
            for b in model.buffers():
                dist.broadcast(b, 0)
        rec = {'step': step, 'epoch': round(step / steps_per_epoch, 3)}
        for name, m in [('', model)] + ([('ema_', ema)] if ema is not None else []):
            rec[f'{name}acc1'], rec[f'{name}acc5'], rec['n'] = evaluate(m, val_loader, device, autocast, ddp)
            best[f'{name}acc1'] = max(best[f'{name}acc1'], rec[f'{name}acc1'])
        if master:
            ema_txt = f" ema top-1 {rec['ema_acc1']:.2f}" if ema is not None else ''
            print(f"eval step {step} ep {rec['epoch']:.2f}: top-1 {rec['acc1']:.2f} top-5 {rec['acc5']:.2f}{ema_txt} "
                  f"best {best['acc1']:.2f} ({rec['n']} val images)", flush=True)
            with open(os.path.join(cfg.out_dir, 'log.jsonl'), 'a') as f:
                f.write(json.dumps({'eval': True, **rec}) + '\n')
        return rec

    def checkpoint():
        state = {'method': METHOD, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                 'scaler': scaler.state_dict(), 'step': step, 'epoch': step / max(1, steps_per_epoch),
                 'config': dataclasses.asdict(cfg), 'best': best,
                 'ema': ema.state_dict() if ema is not None else None,
                 'encoder': vit.backbone_state_dict(backbone)}
        save_checkpoint(os.path.join(cfg.out_dir, 'checkpoint.pt'), state)

    # the loop: one optimizer step = accum_iter micro-batches; evaluation at every epoch end and at the last step
    model.train()
    stream = data.batches(loader, sampler, step * cfg.accum_iter)
    stats_sum = torch.zeros(len(STATS), device=device)  # summed on the device, read only on log steps
    t0, t_start, step_start, last = time.time(), time.time(), step, None
    save_every = cfg.save_every or steps_per_epoch
    while step < end_step:
        batches = []
        for _ in range(cfg.accum_iter):
            _, (x, y) = next(stream)
            batches.append((x.to(device, non_blocking=True), y.to(device, non_blocking=True)))
        torch.manual_seed(step_seed(cfg.seed, rank, step))
        sched = {'lr': lr_at(step, base_lr, cfg.min_lr, warmup_steps, total_steps)}
        stats_sum += train_step(fwd, model, ema, optimizer, scaler, autocast, batches, sched, cfg, num_classes,
                                mixer, smoothing)
        step += 1
        save_now = step % save_every == 0 or step == end_step
        if step % cfg.log_every == 0 or save_now:  # a non-finite loss is looked for here: never saved
            n, dt = step - step_start, time.time() - t0
            rec = {'step': step, 'end_step': end_step, 'epoch': step / steps_per_epoch, 'n': n, **sched,
                   'img_per_s': n * eff_batch / dt, 'eta_min': (end_step - step) * dt / n / 60}
            log_stats(stats_sum, STATS, rec, ddp, master, cfg.out_dir)
            stats_sum.zero_()
            t0, step_start = time.time(), step
        if step % steps_per_epoch == 0 or step == end_step:
            last = run_eval()
            t0 = time.time()
        if save_now and master:
            checkpoint()
    if last is None:  # nothing left to train (resumed at the end): evaluate what was loaded
        last = run_eval()
    if master:
        res = {'mode': cfg.mode, 'checkpoint': cfg.checkpoint, 'pool': cfg.pool, 'last_acc1': last['acc1'],
               'last_acc5': last['acc5'], 'best_acc1': best['acc1'], 'n': last['n'], 'steps': step}
        if ema is not None:
            res.update(last_ema_acc1=last['ema_acc1'], best_ema_acc1=best['ema_acc1'])
        if knn is not None:
            res.update(knn_acc1=knn['knn_acc1'], knn_acc5=knn['knn_acc5'])
        with open(os.path.join(cfg.out_dir, 'results.json'), 'w') as f:
            json.dump(res, f)
        print(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min; top-1 last {last['acc1']:.2f} "
              f"best {best['acc1']:.2f} ({last['n']} val images); wrote {cfg.out_dir}/checkpoint.pt, "
              f"results.json, log.jsonl")


MODE_KEYS = {  # the flags each mode uses (the first line shows these, resolved)
    'knn': ('data', 'model', 'img_size', 'patch_size', 'mode', 'checkpoint', 'checkpoint_key', 'pool', 'knn_k',
            'knn_t', 'train_samples', 'eval_samples', 'batch_size', 'out_dir', 'dtype', 'seed', 'num_workers',
            'device'),
    'train': ('epochs', 'accum_iter', 'blr', 'lr', 'min_lr', 'warmup_epochs', 'weight_decay', 'ema', 'resume',
              'save_every', 'compile', 'log_every', 'max_steps'),
    'finetune': ('layer_decay', 'drop_path', 'mixup', 'cutmix', 'smoothing', 'rand_augment', 'reprob'),
}


def plan(cfg, n_train, world):
    """The step plan of a finetune / linprobe run on n_train images: (steps_per_epoch, total_steps, end_step (after
    --max_steps), effective batch, base lr, warm-up steps)."""
    steps_per_epoch = n_train // (cfg.batch_size * world) // cfg.accum_iter
    total_steps = cfg.epochs * steps_per_epoch
    end_step = min(total_steps, cfg.max_steps) if cfg.max_steps > 0 else total_steps
    eff_batch = cfg.batch_size * cfg.accum_iter * world
    base_lr = cfg.lr if cfg.lr > 0 else cfg.blr * eff_batch / 256
    return steps_per_epoch, total_steps, end_step, eff_batch, base_lr, int(cfg.warmup_epochs * steps_per_epoch)


def picked(cfg, key):
    """What the regime of --data and the mode pick for `key` (MODES, IBOT_PROBE)."""
    regime = data.regime(cfg.data)
    table = IBOT_PROBE if cfg.mode == 'linprobe' and cfg.protocol == 'ibot' else MODES[cfg.mode]
    return table[regime].get(key)


def run_config(cfg, world, device, dtype, n_train, num_classes, absent=()):
    """The first line of a run: the regime and the resolved values of the flags this mode uses (linprobe with
    --cache 1 trains a head on fixed center-crop features: no augmentation, no layer decay, and the kNN of the same
    features (mae) comes with it); for a training mode the effective batch, lr and steps."""
    keys = MODE_KEYS['knn'] if cfg.mode == 'knn' else MODE_KEYS['knn'][:8] + MODE_KEYS['knn'][10:] + MODE_KEYS['train']
    if cfg.mode == 'linprobe':
        keys += ('cache', 'protocol') + (('knn_k', 'knn_t') if cfg.cache and cfg.protocol == 'mae' else ())
    if cfg.mode == 'finetune':
        keys += MODE_KEYS['finetune']
    rec = {'method': METHOD, 'regime': data.regime(cfg.data), **{k: getattr(cfg, k) for k in keys}, 'world': world,
           'device': device, 'dtype': dtype, 'train_images': n_train, 'classes': num_classes}
    if absent:  # a val/ that covers fewer classes than train/: fine, and said here
        rec['val_lacks_classes'] = list(absent)
    if cfg.mode != 'knn':
        _, total_steps, end_step, eff_batch, base_lr, warmup_steps = plan(cfg, n_train, world)
        rec.update(effective_batch=eff_batch, lr=base_lr, steps=total_steps, end_step=end_step,
                   warmup_steps=warmup_steps)
    return rec


def main(argv=None):
    cfg = get_config(argv)

    ddp, rank, local_rank, world, device = setup_distributed(cfg)
    master = rank == 0
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    dtype, autocast, scaler = setup_precision(cfg, device_type)

    env = SimpleNamespace(ddp=ddp, rank=rank, local_rank=local_rank, world=world, master=master, device=device,
                          device_type=device_type, dtype=dtype, autocast=autocast, scaler=scaler)

    # data: the train / val images; each mode picks its training transform
    try:
        base = data.build_dataset(cfg.data, 'train', cfg.img_size)
        val_base = data.build_dataset(cfg.data, 'val', cfg.img_size, classes=base.classes)  # labels by class name
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'error: {e}')
    absent = getattr(val_base, 'absent', [])  # training classes val/ has no image of (a folder's)
    num_classes = len(base.classes)
    base, val_base = data.subset(base, cfg.train_samples), data.subset(val_base, cfg.eval_samples)
    val_set = data.Seeded(val_base, eval_transform(cfg.img_size))
    if master:  # the first line: the regime and what this mode uses, resolved; then what the user should know
        print(json.dumps(run_config(cfg, world, device, dtype, len(base), num_classes, absent)))
        for note in getattr(cfg, 'notes', []):
            print(note)
        knn_used = cfg.mode == 'knn' or (cfg.mode == 'linprobe' and cfg.cache and cfg.protocol == 'mae')
        if knn_used and len(base) < cfg.knn_k:
            print(f'kNN: {len(base)} training images, fewer than --knn_k {cfg.knn_k}: every val image is voted on by '
                  f'all {len(base)}')
        if cfg.mode != 'knn':
            spe, _, end_step, _, _, warmup_steps = plan(cfg, len(base), world)
            data.warn_warmup(warmup_steps, end_step, f'--warmup_epochs {cfg.warmup_epochs:g}')

    # the pre-trained backbone (same initial weights on every rank: the frozen ones are never broadcast)
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg, num_classes, master).to(device)
    if cfg.mode == 'knn':
        run_knn(cfg, env, backbone, base, val_set, num_classes)
    elif cfg.mode == 'linprobe':
        run_linprobe(cfg, env, backbone, base, val_set, num_classes)
    else:
        run_finetune(cfg, env, backbone, base, val_set, num_classes)
    if ddp:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
