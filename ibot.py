"""
ibot.py -- iBOT pre-training (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer"), one file.

Masked self-distillation: an EMA teacher (the "online tokenizer") sees two unmasked global crops and gives a
soft distribution over K prototypes for its [CLS] token and for every patch; the student sees the same global
crops with blockwise-masked patches replaced by a mask token, plus small local crops. L_CLS: the student's [CLS]
of every view predicts the teacher's [CLS] of the *other* global views (DINO). L_MIM: the student's patch
tokens predict the teacher's patch distributions of the *same* view at the masked positions.

As the official code (main_ibot.py, models/head.py, models/vision_transformer.py, loader.py): the centers are EMAs
of the mean over all teacher rows (both global crops of every image, all ranks); the local crops' position
embedding is resized with DINO's interpolate(scale_factor=(g' + 0.1) / g, bicubic); the teacher's head is always
shared by [CLS] and patches (shared_head_teacher), also under --shared_head false, where the student's separate
patch layer then has no teacher counterpart (the EMA pairs parameters by name); BEiT's blockwise mask generator.

  python ibot.py                                                # embedded data, CPU: tiny ViT, 312 steps
  torchrun --nproc_per_node=8 ibot.py --data /path/to/imagenet  # recipe: ViT-B/16, 400 ep, batch 1024, 2+10 crops
  torchrun --nproc_per_node=8 ibot.py --data /path/to/imagenet --model small --epochs 800
                                                                # the official ViT-S/16 command (norm_last_layer false)
  python ibot.py --help                                         # every knob, with its default

Measured (shared 2-core CPU at load average 7-10, torch 2.14, fp32, embedded shapes): `python ibot.py --max_steps 40`
(the defaults: batch 32, 2x64 px + 2x32 px crops, K 1024; the first 40 of 312 steps) took 11.7 min (17.5 s a step),
stayed finite, L_CLS + L_MIM 10.14 -> 10.12 (means over steps 1-20 and 21-40), teacher entropy 6.00 -> 6.05 nats
(ln K = 6.93), KL(teacher || student) 0.83 -> 0.77. No ImageNet run here.

Letters in shape comments: B batch, G global crops (2), V views (2 + local crops), L patches of a global crop,
D encoder width, K prototypes (out_dim).
"""
import argparse
import copy
import dataclasses
import errno
import inspect
import json
import math
import os
import shlex
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.transforms import v2

import data
import vit

METHOD = 'ibot'

# -----------------------------------------------------------------------------
# config: typed defaults, one comment each (the comment is the flag's --help); 0 / '' / -1 = picked by --data


@dataclass
class Config:
    data: str = ''             # '' = embedded shapes; fashion-mnist | mnist | idx:DIR; or an image folder
    model: str = ''            # ViT size: mini|tiny|small|base|large|huge
    img_size: int = 0          # global crop resolution in pixels
    local_size: int = 0        # local crop resolution in pixels
    patch_size: int = 0        # patch side in pixels; 0 on a folder = the model's own (16, 14 for huge)
    local_crops_number: int = -1  # local crops per image
    global_scale_min: float = 0.25  # global crops: RandomResizedCrop scale (this, 1)
    local_scale_min: float = 0.05   # local crops: scale (this, global_scale_min)
    pred_ratio: float = 0.3    # mean fraction of masked patches of a masked global crop
    pred_ratio_var: float = 0.2  # the fraction is drawn from U(pred_ratio - var, pred_ratio + var)
    no_mask_prob: float = 0.5  # each global crop is left unmasked with this probability (recipe: --pred_ratio 0 0.3)
    pred_start_epoch: int = 0  # no masking (and patch temperature held at its start) before this epoch
    out_dim: int = 0           # K prototypes of the head
    head_hidden: int = 0       # width of the head's 3-layer MLP
    shared_head: bool = True   # student: [CLS] and patches share the head's last layer (recipe: true; teacher: always)
    norm_last_layer: bool = None  # freeze the weight-norm gain g = 1; unset = the official commands': false for
    #                               ViT-S (--model small), true for the other sizes
    freeze_last_layer: int = 1  # epochs during which the last layer gets no update
    drop_path: float = 0.1     # stochastic depth of the student (the teacher has none)
    ema_momentum: float = 0.996  # EMA momentum of the teacher at step 0, half cosine to 1 at the end
    center_momentum: float = 0.9  # EMA momentum of the [CLS] and patch centers
    student_temp: float = 0.1  # student softmax temperature
    warmup_teacher_temp: float = 0.04  # teacher [CLS] temperature at epoch 0 ...
    teacher_temp: float = 0.07  # ... rising linearly to this (recipe 0.07; above 0.07 is unstable)
    warmup_teacher_patch_temp: float = 0.04  # teacher patch temperature at epoch 0 ...
    teacher_patch_temp: float = 0.07  # ... rising linearly to this
    warmup_teacher_temp_epochs: int = -1  # epochs of both temperature warm-ups
    lambda1: float = 1.0       # weight of L_CLS
    lambda2: float = 1.0       # weight of L_MIM
    epochs: int = 0            # pre-training epochs
    batch_size: int = 0        # per process (effective batch = batch_size * accum_iter * processes)
    accum_iter: int = 1        # gradient accumulation: micro-batches per optimizer step
    blr: float = 0.0           # base learning rate: lr = blr * effective_batch / 256
    lr: float = 0.0            # absolute learning rate; overrides blr when > 0
    min_lr: float = 1e-6       # end of the cosine schedule
    warmup_epochs: float = -1  # linear warm-up from 0, in epochs
    weight_decay: float = 0.04  # AdamW weight decay at step 0 (none on biases and 1-D params) ...
    weight_decay_end: float = 0.4  # ... cosine to this at the end
    clip_grad: float = 3.0     # max L2 norm of each parameter's gradient (per tensor, as the recipe); 0 = off
    out_dir: str = 'out/ibot'  # checkpoint.pt, log.jsonl
    resume: str = ''           # '' fresh; 'auto' = out_dir/checkpoint.pt if present; or a checkpoint path
    trust_checkpoint: bool = False  # load a file that is more than data (its unpickling can run code); only if trusted
    save_every: int = 0        # optimizer steps between checkpoints; 0 = once per epoch (always at the end)
    keep_every: int = -1       # keep out_dir/checkpoint-EPOCH.pt (encoder, config, step) after every this many epochs
    #                            (0 = off)
    knn_every: int = -1        # kNN monitor: top-1 of the encoder (as finetune.py --mode knn) on a fixed labelled set
    #                            at step 0, every this many epochs and at the last step, logged as knn_top1 (0 = off)
    knn_train: int = 0         # kNN monitor: training images that vote (a fixed subset, the same in every run)
    knn_val: int = 0           # kNN monitor: held-out images it scores (a fixed subset, the same in every run)
    dtype: str = ''            # bf16|fp16|fp32; '' = bf16 on CUDA, fp32 on CPU
    compile: bool = False      # torch.compile student and teacher (eager is what the tests run)
    seed: int = 0              # data order, augmentation, masks and drop path are pure functions of (seed, step)
    num_workers: int = -1      # loader workers per process, capped at the CPUs this process may use
    log_every: int = 20        # optimizer steps between log lines (the only host syncs)
    max_steps: int = 0         # stop after this many optimizer steps (0 = all epochs); the schedule is unchanged
    device: str = ''           # cuda|cuda:N|cpu; '' = cuda if available


# what 0 / '' / -1 resolve to: the embedded shapes (CPU, minutes), the small idx datasets (the README's CPU-scale
# Results protocol), an image folder (the paper's recipe: ViT-B/16, 400 epochs, batch 1024, 2 + 10 crops)
REGIMES = {
    'embedded': dict(model='tiny', img_size=64, local_size=32, patch_size=8, local_crops_number=2, out_dim=1024,
                     head_hidden=512, warmup_teacher_temp_epochs=2, epochs=2, batch_size=32, blr=2e-3,
                     warmup_epochs=0.5, num_workers=2,
                     knn_every=0, knn_train=100, knn_val=50, keep_every=0),
    'small': dict(model='mini', img_size=32, local_size=16, patch_size=4, local_crops_number=2, out_dim=1024,
                  head_hidden=512, warmup_teacher_temp_epochs=1, epochs=1, batch_size=128, blr=2e-3,
                  warmup_epochs=0.1, num_workers=2,
                  knn_every=1, knn_train=1000, knn_val=500, keep_every=0),
    'folder': dict(model='base', img_size=224, local_size=96, patch_size=0, local_crops_number=10, out_dim=8192,
                   head_hidden=2048, warmup_teacher_temp_epochs=30, epochs=400, batch_size=128, blr=5e-4,
                   warmup_epochs=10, num_workers=10,
                   knn_every=1, knn_train=20000, knn_val=5000, keep_every=20),
}
ARCH_KEYS = ('model', 'img_size', 'patch_size', 'out_dim', 'head_hidden', 'shared_head')  # must match on resume


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
    at 0 / '' / -1 are filled from the regime of --data (REGIMES) and check_config validates the result."""
    def boolean(s):
        if s.lower() not in ('1', 'true', 'yes', 'on', '0', 'false', 'no', 'off'):
            raise argparse.ArgumentTypeError(f'expected true or false, got {s!r}')
        return s.lower() in ('1', 'true', 'yes', 'on')
    helps = field_help(Config)
    p = argparse.ArgumentParser(description=__doc__, epilog=data.REGIME_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        picked = '; '.join(f'{r} {v[f.name]!r}' for r, v in REGIMES.items() if f.name in v)
        default = f'default {f.default!r}' + (f' = picked by --data: {picked}' if picked else '')
        kind = dict(type=boolean, nargs='?', const=True, metavar='BOOL') if f.type is bool else dict(type=f.type)
        p.add_argument(f'--{f.name}', default=f.default, help=f'{helps.get(f.name, "")} ({default})'.replace('%', '%%'),
                       **kind)  # a bare --compile means --compile true
    cfg = Config(**vars(p.parse_args(argv)))
    for k, v in REGIMES[data.regime(cfg.data)].items():
        if getattr(cfg, k) == Config.__dataclass_fields__[k].default:  # left at its 'pick by data' default
            setattr(cfg, k, v)
    if cfg.model not in vit.SIZES:
        p.error(f'--model must be one of {", ".join(vit.SIZES)}, got {cfg.model!r}')
    if cfg.patch_size == 0:
        cfg.patch_size = vit.SIZES[cfg.model][3]
    if cfg.img_size % cfg.patch_size:
        p.error(f'--img_size {cfg.img_size} is not divisible by --patch_size {cfg.patch_size}')
    if cfg.dtype not in ('', 'bf16', 'fp16', 'fp32'):
        p.error(f'--dtype must be bf16, fp16 or fp32, got {cfg.dtype!r}')
    if min(cfg.epochs, cfg.batch_size, cfg.accum_iter, cfg.log_every) < 1 or cfg.save_every < 0:
        p.error('--epochs, --batch_size, --accum_iter and --log_every must be >= 1, --save_every >= 0')
    if min(cfg.knn_every, cfg.keep_every) < 0 or min(cfg.knn_train, cfg.knn_val) < 1:
        p.error('--knn_every and --keep_every must be >= 0, --knn_train and --knn_val >= 1')
    cfg.num_workers = data.default_workers(cfg.num_workers)
    check_config(cfg, p.error)
    return cfg


def check_config(cfg, error):
    """iBOT's own checks, after the defaults are filled; error(msg) exits with the usage line."""
    if cfg.norm_last_layer is None:  # the official ViT-S/16 command passes --norm_last_layer false, ViT-B true
        cfg.norm_last_layer = cfg.model != 'small'
    if cfg.local_size % cfg.patch_size:
        error(f'--local_size {cfg.local_size} is not divisible by --patch_size {cfg.patch_size}')
    if cfg.local_crops_number < 0:
        error(f'--local_crops_number must be >= 0, got {cfg.local_crops_number}')
    if not 0.0 < cfg.local_scale_min < cfg.global_scale_min < 1.0:
        error('need 0 < --local_scale_min < --global_scale_min < 1')
    if not 0.0 <= cfg.pred_ratio - cfg.pred_ratio_var <= cfg.pred_ratio + cfg.pred_ratio_var < 1.0:
        error(f'--pred_ratio +- --pred_ratio_var must lie in [0, 1), got {cfg.pred_ratio} +- {cfg.pred_ratio_var}')
    if not 0.0 <= cfg.no_mask_prob <= 1.0:
        error(f'--no_mask_prob must be in [0, 1], got {cfg.no_mask_prob}')
    temps = (cfg.student_temp, cfg.teacher_temp, cfg.warmup_teacher_temp, cfg.teacher_patch_temp,
             cfg.warmup_teacher_patch_temp)
    if min(temps) <= 0:
        error('temperatures must be > 0')
    if cfg.out_dim < 1 or cfg.head_hidden < 1:
        error('--out_dim and --head_hidden must be >= 1')

# -----------------------------------------------------------------------------
# recipe: augmentation and masking (official main_ibot.py DataAugmentationiBOT, loader.py ImageFolderMask)


class MultiCropTransform:
    """iBOT/DINO multi-crop: 2 global crops (global 1 blur p 1.0; global 2 blur p 0.1 + solarize p 0.2) and
    `n_local` local crops (blur p 0.5), all with flip + colour jitter (p 0.8) + grayscale (p 0.2), RRC bicubic.
    Returns a list of 2 + n_local tensors, uint8 with normalize=False (to_device)."""

    def __init__(self, global_size, local_size, n_local, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25),
                 normalize=True):
        def crop(size, scale, *extra):
            return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=scale, antialias=True,
                                                                  interpolation=v2.InterpolationMode.BICUBIC),
                               v2.RandomHorizontalFlip(), data.color_jitter(), v2.RandomGrayscale(0.2), *extra]
                              + data._finish(normalize))
        self.global1 = crop(global_size, global_scale, data.gaussian_blur(1.0))
        self.global2 = crop(global_size, global_scale, data.gaussian_blur(0.1),
                            v2.RandomSolarize(128, p=0.2))
        self.local = crop(local_size, local_scale, data.gaussian_blur(0.5))
        self.n_local = n_local

    def __call__(self, img):
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.n_local)]


def ibot_mask(h, w, rng, ratio=(0.1, 0.5), no_mask_prob=0.5, min_patches=None):
    """iBOT recipe (`--pred_ratio 0 0.3 --pred_ratio_var 0 0.2`): with probability no_mask_prob no mask at all,
    else a blockwise mask of at most r*h*w cells with r ~ U(ratio). Returns bool (h, w)."""
    if rng.random() < no_mask_prob:
        return np.zeros((h, w), dtype=bool)
    r = rng.uniform(*ratio)
    min_patches = (min(h, w) // 3) ** 2 if min_patches is None else min_patches
    return data.block_mask(h, w, r * h * w, rng, min_patches=max(1, min_patches))


class MultiCropMasks:
    """(img, rng) -> (crops, masks): 2 global + n local crops (MultiCropTransform) and one blockwise mask
    per global crop, bool (2, h, w), drawn from the sample's rng (recipe: no mask with p 0.5, else at most
    r*h*w patches, r ~ U(0.1, 0.5)), so masks, like crops, are a pure function of (seed, epoch, index)."""

    def __init__(self, cfg):
        self.multicrop = MultiCropTransform(cfg.img_size, cfg.local_size, cfg.local_crops_number,
                                            global_scale=(cfg.global_scale_min, 1.0),
                                            local_scale=(cfg.local_scale_min, cfg.global_scale_min),
                                            normalize=False)  # uint8 crops, normalised on the device
        self.grid = cfg.img_size // cfg.patch_size
        self.ratio = (cfg.pred_ratio - cfg.pred_ratio_var, cfg.pred_ratio + cfg.pred_ratio_var)
        self.no_mask_prob = cfg.no_mask_prob

    def masks(self, rng):
        """(2, h, w) bool, each global crop decided independently."""
        return torch.from_numpy(np.stack([ibot_mask(self.grid, self.grid, rng, self.ratio, self.no_mask_prob)
                                          for _ in range(2)]))

    def __call__(self, img, rng):
        return self.multicrop(img), self.masks(rng)

# -----------------------------------------------------------------------------
# model: ViT backbone with a mask token + iBOT head (paper sec. 3.2, official models/head.py)


class WeightNormLinear(nn.Module):
    """Linear without bias, weight = g * v / ||v|| per output row (weight normalisation; official layout
    weight_g (K, 1), weight_v (K, in)). With frozen g = 1 every prototype is a unit vector."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        bound = 1 / math.sqrt(dim_in)  # nn.Linear's default init; only the direction matters
        self.weight_v = nn.Parameter(torch.empty(dim_out, dim_in).uniform_(-bound, bound))
        self.weight_g = nn.Parameter(torch.ones(dim_out, 1))

    def forward(self, x):
        return F.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


class iBOTHead(nn.Module):
    """3-layer MLP D -> hidden -> hidden -> 256 (GELU), L2-normalise, weight-normalised Linear 256 -> K.
    The MLP is shared by [CLS] and patch tokens; the last layer too when shared=True."""

    def __init__(self, dim, out_dim, hidden=2048, bottleneck=256, shared=True, norm_last_layer=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck, out_dim)
        self.last_layer2 = self.last_layer if shared else WeightNormLinear(bottleneck, out_dim)
        for layer in (self.last_layer, self.last_layer2):
            layer.weight_g.requires_grad = not norm_last_layer

    def forward_cls(self, cls):
        """(N, D) [CLS] features -> (N, K) logits."""
        return self.last_layer(F.normalize(self.mlp(cls), dim=-1))

    def forward(self, tokens):
        """(N, 1+L, D) all tokens -> [CLS] logits (N, K), patch logits (N, L, K)."""
        z = F.normalize(self.mlp(tokens), dim=-1)  # (N, 1+L, 256) on the unit sphere
        return self.last_layer(z[:, 0]), self.last_layer2(z[:, 1:])


class iBOT(nn.Module):
    """Backbone + head, the student (drop path, masked globals + local crops) or the teacher (unmasked globals)."""

    def __init__(self, cfg, drop_path=0.0):
        super().__init__()
        self.backbone = vit.vit(cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=0,
                                pos_embed='learned', mask_token=True, weight_init='trunc_normal',
                                drop_path_rate=drop_path, dino_interp=True)  # local crops: official +0.1 form
        self.head = iBOTHead(self.backbone.embed_dim, cfg.out_dim, cfg.head_hidden, shared=cfg.shared_head,
                             norm_last_layer=cfg.norm_last_layer)

    def forward(self, globals_, locals_=None, mask=None):
        """globals_ (G*B, 3, H, W), view-major; locals_ (n*B, 3, h, w) or None; mask (G*B, L) bool or None ->
        [CLS] logits (V*B, K) (globals then locals), patch logits (G*B, L, K) of the global crops.
        One backbone pass per resolution; the position embedding is interpolated for the local grid."""
        cls, patch = self.head(self.backbone.forward_features(globals_, mask))  # (G*B, K), (G*B, L, K)
        if locals_ is not None:
            cls_local = self.head.forward_cls(self.backbone.forward_features(locals_)[:, 0])  # (n*B, K), unmasked
            cls = torch.cat([cls, cls_local])
        return cls, patch


def build_teacher(model):
    """The EMA teacher: a copy of the student (same start) without stochastic depth or gradients, never DDP.
    Its head's last layer is always shared by [CLS] and patches (official shared_head_teacher, default true), also
    under --shared_head false; the student's separate last_layer2 then has no teacher counterpart. The shared layer
    starts from the student's last_layer2 (official load_state_dict(student, strict=False) loads last_layer, then
    last_layer2, into the same module) and follows the EMA of the student's [CLS] last_layer (ema_update)."""
    teacher = copy.deepcopy(model).requires_grad_(False)
    for blk in teacher.backbone.blocks:
        blk.drop_path = 0.0
    teacher.head.last_layer = teacher.head.last_layer2  # a no-op when the student's head is shared
    return teacher

# -----------------------------------------------------------------------------
# loss: softmaxes, cross-entropies and centers in fp32 (called outside autocast)


def teacher_probs(t_logits, center, temp):
    """Centred, sharpened teacher distribution softmax((t - c) / temp): t (..., K), c broadcastable -> (..., K)."""
    return F.softmax((t_logits.float() - center) / temp, dim=-1)


def cls_loss(s_cls, t_prob, student_temp):
    """L_CLS (paper eq. 3, DINO): s_cls (V, B, K) student logits, globals first; t_prob (G, B, K) ->
    mean over the G*(V-1) pairs of different views q != v of the batch-mean H(P_t(q), P_s(v))."""
    G, B = t_prob.shape[:2]
    logp = F.log_softmax(s_cls / student_temp, dim=-1, dtype=torch.float32)  # (V, B, K), fp32 out of bf16 in
    ce = -torch.einsum('qbk,vbk->qv', t_prob, logp) / B  # (G, V) batch-mean cross-entropies
    other = 1.0 - torch.eye(G, s_cls.shape[0], device=ce.device)  # (G, V) 0 on the same-view pairs
    return (ce * other).sum() / other.sum()


def mim_loss(s_patch, t_prob, mask, student_temp):
    """L_MIM (paper eq. 2): s_patch (G, B, L, K) student logits, t_prob (G, B, L, K), mask (G, B, L) bool ->
    per image the mean patch cross-entropy over its masked patches (count clamped >= 1), then the mean over
    images (unmasked images count as 0, as in the official code) and views."""
    # dtype=float32: the softmax runs in fp32 without a separate fp32 copy of the (G, B, L, K) logits
    ce = -(t_prob * F.log_softmax(s_patch / student_temp, dim=-1, dtype=torch.float32)).sum(-1)  # (G, B, L)
    m = mask.float()
    return ((ce * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()


def entropy(p):
    """Mean entropy (nats) of the distributions p (..., K)."""
    return -(p * torch.log(p.clamp(min=1e-30))).sum(-1).mean()


def ibot_loss(s_cls, s_patch, t_cls, t_patch, mask, center, center_patch, temps, student_temp, lambdas):
    """s_cls (V*B, K), s_patch (G*B, L, K), t_cls (G*B, K), t_patch (G*B, L, K), mask (G*B, L) bool,
    center (1, K), center_patch (1, 1, K), temps = ([CLS], patch) teacher temperatures ->
    loss = lambda1 L_CLS + lambda2 L_MIM, and detached stats (L_CLS, L_MIM, teacher [CLS] entropy, mean KL)."""
    GB, L, K = t_patch.shape
    G = 2
    B = GB // G
    t_prob = teacher_probs(t_cls, center, temps[0]).view(G, B, K)  # (G, B, K)
    tp_prob = teacher_probs(t_patch, center_patch, temps[1]).view(G, B, L, K)  # (G, B, L, K)
    l_cls = cls_loss(s_cls.view(-1, B, K), t_prob, student_temp)
    l_mim = mim_loss(s_patch.view(G, B, L, K), tp_prob, mask.view(G, B, L), student_temp)
    ent = entropy(t_prob)
    # every teacher view is in V-1 pairs, so L_CLS - mean H(P_t) is the mean KL(P_t || P_s) over the pairs
    stats = torch.stack([l_cls, l_mim, ent, l_cls - ent]).detach()
    return lambdas[0] * l_cls + lambdas[1] * l_mim, stats


class Centers(nn.Module):
    """The teacher's [CLS] center (1, K) and patch center (1, 1, K) (official iBOTLoss buffers), set by
    update_centers after each step; saved and restored with the checkpoint."""

    def __init__(self, K):
        super().__init__()
        self.register_buffer('center', torch.zeros(1, K))
        self.register_buffer('center_patch', torch.zeros(1, 1, K))


def center_sums(t_cls, t_patch):
    """Sums over the N teacher rows (both global crops of every image) of the raw teacher outputs: t_cls (N, K),
    t_patch (N, L, K) -> (2, K): [CLS] sum and the sum of per-row means over *all* patches (masked or not)."""
    return torch.stack([t_cls.float().sum(0), t_patch.float().mean(1).sum(0)])


@torch.no_grad()
def update_centers(center, center_patch, sums, n, momentum):
    """c <- m c + (1 - m) batch mean, the mean over the n teacher rows of this process (2 global crops per image:
    n = 2 B accum_iter) and of all ranks (all-reduced; official iBOTLoss.update_center divides by
    len(teacher_cls) * world_size). center (1, K), center_patch (1, 1, K), sums (2, K) from center_sums over the
    same n rows -> new (center, center_patch)."""
    sums = sums.clone()
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
        world = dist.get_world_size()
    mean = sums / (n * world)  # (2, K)
    return (center * momentum + mean[0].view_as(center) * (1 - momentum),
            center_patch * momentum + mean[1].view_as(center_patch) * (1 - momentum))

# -----------------------------------------------------------------------------
# optimizer and schedules


def param_groups(model, weight_decay):
    """AdamW groups as the official get_params_groups: no weight decay on biases and 1-D params (norms); tokens,
    position embedding and the mask token are 2-D and decayed. Frozen parameters are left out."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or n.endswith('.bias') else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


def cosine_at(step, start, end, total_steps):
    """Half-cycle cosine from start (step 0) to end (step total_steps)."""
    t = min(max(step, 0) / max(1, total_steps), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def lr_at(step, base_lr, min_lr, warmup_steps, total_steps):
    """Per-step linear warm-up from 0, then half-cycle cosine to min_lr (MAE util/lr_sched.py)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def teacher_temp_at(epoch, warmup_temp, temp, warmup_epochs):
    """Per epoch, as the official schedule concatenates them: np.linspace(warmup_temp, temp, warmup_epochs)[epoch],
    then temp. A 1-epoch warm-up is linspace(a, b, 1) = [a]: warmup_temp for that epoch. epoch < 0 (before
    --pred_start_epoch for the patch temperature) holds warmup_temp."""
    if epoch < 0:
        return warmup_temp
    if epoch >= warmup_epochs:
        return temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (temp - warmup_temp) * epoch / (warmup_epochs - 1)


def cancel_last_layer_grads(model):
    """During the first --freeze_last_layer epochs the head's last layer gets no update (no grad: AdamW skips it,
    weight decay included)."""
    for n, p in model.named_parameters():
        if 'last_layer' in n:
            p.grad = None


@torch.no_grad()
def clip_per_tensor_(params, max_norm):
    """Scale each gradient tensor to L2 norm <= max_norm separately (official utils.clip_gradients), without a
    host sync. Per tensor, not global: the recipe's lr and 3.0 were tuned with it, and a global clip would let the
    head's large early gradients shrink every backbone update. Returns the global norm before clipping (logged)."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads)
    if max_norm > 0:
        torch._foreach_mul_(grads, [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms])
    return torch.linalg.vector_norm(torch.stack(norms))


def momentum_at(step, base, total_steps):
    """EMA momentum after optimizer step `step`: 1 - (1 - base) (1 + cos(pi step / T)) / 2, base at 0, 1 at T."""
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * min(step / max(1, total_steps), 1.0)))


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


def schedules(step, cfg, base_lr, warmup_steps, total_steps, steps_per_epoch):
    """Every scheduled value of optimizer step `step`: per step lr, weight decay and EMA momentum; per epoch the
    two teacher temperatures, whether the loader's masks apply (--pred_start_epoch) and whether the head's last
    layer is frozen (--freeze_last_layer)."""
    epoch = step // steps_per_epoch
    return {'lr': lr_at(step, base_lr, cfg.min_lr, warmup_steps, total_steps),
            'wd': cosine_at(step, cfg.weight_decay, cfg.weight_decay_end, total_steps),
            'momentum': momentum_at(step, cfg.ema_momentum, total_steps),
            'temp': teacher_temp_at(epoch, cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs),
            'patch_temp': teacher_temp_at(epoch - cfg.pred_start_epoch, cfg.warmup_teacher_patch_temp,
                                          cfg.teacher_patch_temp, cfg.warmup_teacher_temp_epochs),
            'masking': int(epoch >= cfg.pred_start_epoch), 'freeze_last_layer': int(epoch < cfg.freeze_last_layer)}

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


def state_bytes(obj, trainable=False):
    """Bytes of the tensors of obj.state_dict(), or with trainable=True of a module's trainable parameters (AdamW keeps
    two moments of each): what the start-up check of the room on disk adds up."""
    if trainable:
        return sum(p.numel() * p.element_size() for p in obj.parameters() if p.requires_grad)
    return sum(t.numel() * t.element_size() for t in obj.state_dict().values() if torch.is_tensor(t))


def check_room(out_dir, ckpt_bytes, snap_bytes, n_snaps):
    """One warning line when out_dir's filesystem has room for fewer than two checkpoints (the one kept and the
    temporary file of the next) plus the snapshots the run will keep."""
    need, free = 2 * ckpt_bytes + n_snaps * snap_bytes, shutil.disk_usage(out_dir).free
    if free < need:
        print(f'warning: {out_dir} has {free / 2**20:.1f} MB free, less than two checkpoints ({ckpt_bytes / 2**20:.1f} '
              f'MB each) and {n_snaps} snapshots ({snap_bytes / 2**20:.1f} MB each) take; a save that does not fit '
              f'ends the run, the previous checkpoint stays', file=sys.stderr)


@contextmanager
def exit_on_failed_write(path, saved, need=0):
    """A failed write of `path` (a full disk, a quota, a read-only folder) ends the run with one line: the file, the
    error (no space: about `need` bytes needed and how many are free) and the checkpoint that stays intact, `saved`
    = (path, step) or None. torch.save reports a failed write as a RuntimeError whose context is the OSError."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        err = e
        while err is not None and not isinstance(err, OSError):
            err = err.__cause__ or err.__context__
        if err is None or isinstance(err, (ConnectionError, TimeoutError)):  # not a write: a real error
            raise
        why = err.strerror or str(err)
        if err.errno in (errno.ENOSPC, errno.EDQUOT) and os.path.isdir(os.path.dirname(os.path.abspath(path))):
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            why += (f': needs about {need / 2**20:.1f} MB, ' if need else ': ') + f'{free / 2**20:.1f} MB free'
        prev = (f'{saved[0]} (step {saved[1]}) is intact; resume from it with --resume {saved[0]}' if saved
                else 'no checkpoint was written yet')
        print(f'error: cannot write {path} ({why}); {prev}', file=sys.stderr)
        sys.exit(1)


def load_checkpoint(path, cfg):
    """Load a checkpoint to resume from; refuses another method's or another architecture's checkpoint."""
    try:
        ckpt = vit.safe_load(path, cfg.trust_checkpoint)  # weights only, unless --trust_checkpoint
    except ValueError as e:
        sys.exit(f'error: {e}')
    if not isinstance(ckpt, dict) or ckpt.get('method') != METHOD:
        kind = ckpt.get('method') if isinstance(ckpt, dict) else None
        sys.exit(f'error: {path} is {vit.checkpoint_kind(kind)}, not {vit.checkpoint_kind(METHOD)}')
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
# one training step (what main() runs and bench.py times)

STATS = ('loss', 'cls', 'mim', 't_entropy', 'kl', 'grad_norm')  # what train_step returns, summed between log lines


def train_step(fwd, model, teacher, centers, optimizer, scaler, autocast, batches, sched, cfg):
    """One optimizer step: on each micro-batch the teacher on the unmasked global crops, the student on the masked
    global crops and the local crops, L = lambda1 L_CLS + lambda2 L_MIM (fp32, outside autocast), backward
    (gradients accumulate; under DDP all-reduced on the last micro-batch only); then the frozen last layer, the
    per-tensor clip, the optimizer step, the scaler update, the teacher's EMA and the centers, from this step's
    teacher rows over all micro-batches and ranks. batches: accum_iter x (globals_ (G*B, 3, H, W) view-major,
    locals_ (n*B, 3, h, w) or None, mask (G*B, L) bool) on the device. Returns STATS (on the device, no sync)."""
    for g in optimizer.param_groups:
        g['lr'] = sched['lr']
    optimizer.param_groups[0]['weight_decay'] = sched['wd']
    stats_sum, sums, rows = 0.0, 0.0, 0  # rows: teacher rows of this step here (2 global crops per image)
    for i, (globals_, locals_, mask) in enumerate(batches):
        mask = mask if sched['masking'] else torch.zeros_like(mask)  # before --pred_start_epoch: no masking
        ddp = getattr(fwd, '_orig_mod', fwd)  # the DDP module, also inside torch.compile's wrapper
        sync = ddp.no_sync() if isinstance(ddp, DDP) and i < len(batches) - 1 else nullcontext()
        with sync:
            with autocast:
                with torch.no_grad():
                    t_cls, t_patch = teacher(globals_)  # (G*B, K), (G*B, L, K): unmasked globals only
                s_cls, s_patch = fwd(globals_, locals_, mask)  # (V*B, K), (G*B, L, K)
            loss, stats = ibot_loss(s_cls, s_patch, t_cls, t_patch, mask, centers.center, centers.center_patch,
                                    (sched['temp'], sched['patch_temp']), cfg.student_temp, (cfg.lambda1, cfg.lambda2))
            scaler.scale(loss / len(batches)).backward()
        sums = sums + center_sums(t_cls, t_patch)  # (2, K)
        rows += t_cls.shape[0]
        stats_sum = stats_sum + torch.cat([loss.detach()[None], stats]) / len(batches)
    scaler.unscale_(optimizer)
    if sched['freeze_last_layer']:
        cancel_last_layer_grads(model)
    grad_norm = clip_per_tensor_(model.parameters(), cfg.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    ema_update(teacher, model, sched['momentum'])
    centers.center, centers.center_patch = update_centers(centers.center, centers.center_patch, sums, rows,
                                                          cfg.center_momentum)
    return torch.cat([stats_sum, grad_norm.float()[None]])


# -----------------------------------------------------------------------------
# training


def main(argv=None):
    cfg = get_config(argv)
    ddp, rank, local_rank, world, device = setup_distributed(cfg)
    master = rank == 0
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    dtype, autocast, scaler = setup_precision(cfg, device_type)

    # data
    try:
        base = data.build_dataset(cfg.data, 'train', cfg.img_size)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'error: {e}')
    dataset = data.Seeded(base, MultiCropMasks(cfg), with_rng=True)
    try:
        loader, sampler = data.make_loader(dataset, cfg.batch_size, world, rank, cfg.seed, cfg.num_workers)
    except ValueError as e:
        regime = data.regime(cfg.data)
        sys.exit(f'error: {e} (the {regime} regime picks {REGIMES[regime]["batch_size"]})')
    steps_per_epoch = sampler.batches_per_epoch() // cfg.accum_iter
    total_steps = cfg.epochs * steps_per_epoch
    end_step = min(total_steps, cfg.max_steps) if cfg.max_steps > 0 else total_steps
    save_every = cfg.save_every or steps_per_epoch
    eff_batch = cfg.batch_size * cfg.accum_iter * world
    base_lr = cfg.lr if cfg.lr > 0 else cfg.blr * eff_batch / 256
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)

    # model, teacher (a plain module, never DDP-wrapped, updated only by EMA), centers, optimizer
    model = iBOT(cfg, drop_path=cfg.drop_path).to(device)
    teacher = build_teacher(model)
    centers = Centers(cfg.out_dim).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=base_lr, fused=device_type == 'cuda',
                                  foreach=device_type != 'cuda')
    stateful = {'model': model, 'teacher': teacher, 'centers': centers, 'optimizer': optimizer,
                'scaler': scaler}  # what a checkpoint restores
    step = 0
    resume = os.path.join(cfg.out_dir, 'checkpoint.pt') if cfg.resume == 'auto' else cfg.resume
    if resume and not (cfg.resume == 'auto' and not os.path.exists(resume)):
        ckpt = load_checkpoint(resume, cfg)
        restore(ckpt, stateful)
        step = ckpt['step']  # every schedule is a function of the step
        if master:
            print(f'resumed from {resume} at step {step}')
        del ckpt
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        print(json.dumps({'method': METHOD, 'regime': data.regime(cfg.data), **dataclasses.asdict(cfg),
                          'world': world, 'device': device, 'dtype': dtype, 'effective_batch': eff_batch,
                          'lr': base_lr, 'steps': total_steps}))
        print(f'backbone {vit.count_params(model.backbone) / 1e6:.2f}M params, '
              f'total {vit.count_params(model) / 1e6:.2f}M, '
              f'{len(base)} images, {steps_per_epoch} steps/epoch')
        data.warn_warmup(warmup_steps, end_step, f'--warmup_epochs {cfg.warmup_epochs:g}')
    # DDP first, then compile: dynamo splits the graph at DDP's buckets so the all-reduce overlaps backward
    fwd = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None) if ddp else model
    fwd = torch.compile(fwd) if cfg.compile else fwd
    if cfg.compile:
        teacher.compile()  # in place: parameter names (the EMA pairs them by name) and state_dict keys unchanged
    if ddp:
        for t in teacher.state_dict().values():  # DDP synced the student from rank 0; the teacher copy must match
            dist.broadcast(t, 0)

    encoder = teacher.backbone  # what the checkpoint's 'encoder', the kNN monitor and the snapshots hold
    # watching the run: the kNN monitor at step 0, after every knn_every-th epoch and at the last step, each point
    # logged before that step's checkpoint (a resumed run never repeats one); snapshots of the encoder after every
    # keep_every-th epoch; a write that fails ends the run with one line naming the checkpoint that is intact
    log_path, saved = os.path.join(cfg.out_dir, 'log.jsonl'), (resume, step) if step else None
    ckpt_bytes = sum(state_bytes(v) for v in stateful.values()) + 2 * state_bytes(model, True) + state_bytes(encoder)
    knn = data.knn_sets(cfg.data, cfg.img_size, cfg.knn_train, cfg.knn_val) if cfg.knn_every else None
    kept = [e for e in range(step // steps_per_epoch + 1, end_step // steps_per_epoch + 1)
            if cfg.keep_every and e % cfg.keep_every == 0]  # the epochs whose snapshot this run writes
    if master:
        check_room(cfg.out_dir, ckpt_bytes, state_bytes(encoder), len(kept))
        if isinstance(knn, str):
            print(f'knn monitor off: {knn}')
    knn = None if isinstance(knn, str) else knn

    def knn_point():  # every rank embeds its share of the subsets; rank 0 logs
        t = time.time()
        top1 = data.knn_top1(encoder, knn, cfg.batch_size, world, rank, device, autocast, cfg.num_workers)
        if master:
            rec = {'step': step, 'epoch': step / steps_per_epoch, 'knn_top1': top1, 'knn_seconds': time.time() - t}
            print(f"step {step}/{end_step} ep {rec['epoch']:.2f} knn_top1 {top1:.2f} ({len(knn[0])} train, "
                  f"{len(knn[1])} val images, {rec['knn_seconds']:.1f} s)", flush=True)
            with exit_on_failed_write(log_path, saved), open(log_path, 'a') as f:
                f.write(json.dumps(rec) + '\n')

    def snapshot(epoch):  # the encoder only, small: loads in vit.load_vit, finetune.py, eval_seg.py and timm
        path = os.path.join(cfg.out_dir, f'checkpoint-{epoch:04d}.pt')
        with exit_on_failed_write(path, saved, state_bytes(encoder)):
            save_checkpoint(path, {'method': METHOD, 'encoder': vit.backbone_state_dict(encoder),
                                   'config': dataclasses.asdict(cfg), 'step': step})

    if knn and step == 0:
        knn_point()  # the random-init point of the curve

    def checkpoint():
        nonlocal saved
        state = {'method': METHOD, **{k: v.state_dict() for k, v in stateful.items()}, 'step': step,
                 'epoch': step / steps_per_epoch, 'config': dataclasses.asdict(cfg),
                 'encoder': vit.backbone_state_dict(teacher.backbone)}  # iBOT evaluates the teacher
        path = os.path.join(cfg.out_dir, 'checkpoint.pt')
        with exit_on_failed_write(path, saved, ckpt_bytes):
            save_checkpoint(path, state)
        saved = (path, step)

    # the loop: one optimizer step = accum_iter micro-batches
    model.train()
    stream = data.batches(loader, sampler, step * cfg.accum_iter)
    stats_sum = torch.zeros(len(STATS), device=device)  # summed on the device, read only on log steps
    t0, t_start, step_start = time.time(), time.time(), step
    while step < end_step:
        batches = []
        for _ in range(cfg.accum_iter):
            _, ((crops, masks), _) = next(stream)
            crops = [data.to_device(c, device) for c in crops]  # uint8 crops normalised on the device
            globals_ = torch.cat(crops[:2])  # (G*B, 3, H, W), view-major
            locals_ = torch.cat(crops[2:]) if len(crops) > 2 else None  # (n*B, 3, h, w)
            mask = masks.to(device, non_blocking=True).transpose(0, 1).flatten(2).flatten(0, 1)  # (G*B, L) bool
            batches.append((globals_, locals_, mask))
        torch.manual_seed(step_seed(cfg.seed, rank, step))
        sched = schedules(step, cfg, base_lr, warmup_steps, total_steps, steps_per_epoch)
        stats_sum += train_step(fwd, model, teacher, centers, optimizer, scaler, autocast, batches, sched, cfg)
        step += 1
        save_now = step % save_every == 0 or step == end_step
        if step % cfg.log_every == 0 or save_now:  # a non-finite loss is looked for here: never saved
            n, dt = step - step_start, time.time() - t0
            rec = {'step': step, 'end_step': end_step, 'epoch': step / steps_per_epoch, 'n': n, **sched,
                   'img_per_s': n * eff_batch / dt, 'eta_min': (end_step - step) * dt / n / 60}
            with exit_on_failed_write(log_path, saved):
                log_stats(stats_sum, STATS, rec, ddp, master, cfg.out_dir)
            stats_sum.zero_()
            t0, step_start = time.time(), step
        epoch = step // steps_per_epoch if step % steps_per_epoch == 0 else 0  # the epoch that ends here, if one does
        if knn and (epoch and epoch % cfg.knn_every == 0 or step == end_step):
            knn_point()
        if master and epoch and cfg.keep_every and epoch % cfg.keep_every == 0:
            snapshot(epoch)
        if save_now and master:
            checkpoint()
    evaluator = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'finetune.py'))
    if master:
        print(f'done: {step} steps in {(time.time() - t_start) / 60:.1f} min; wrote {cfg.out_dir}/checkpoint.pt, '
              f'log.jsonl\nnext: python {evaluator} --mode knn --checkpoint '
              f'{shlex.quote(os.path.join(cfg.out_dir, "checkpoint.pt"))}'
              f'{" --data " + shlex.quote(cfg.data) if cfg.data else ""}')
    if ddp:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
