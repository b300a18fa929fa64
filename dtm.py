"""
dtm.py -- DTM pre-training (Kim, Heo, Han, "Morphing Tokens Draw Strong Masked Image Models", ICLR 2025,
arXiv 2401.00254), one file.

A ViT student sees a blockwise-masked image (exactly 75 of 196 patches replaced by a mask token inside the
encoder) and predicts, with a Linear head on every patch token, the patch features a frozen teacher computes on
the unmasked image. The targets are not matched token by token: each step the teacher tokens are grouped by
iterated bipartite soft matching (ToMe) into a random number of clusters ("dynamic token morphing"), the same
grouping averages the student's tokens, and the two sets of cluster means are aligned with a size-weighted
smooth L1 loss. Supervision thus ranges from token level (no merge) to nearly image level (a few clusters).

Teachers (--teacher): clip (the paper's CLIP ViT-B/16, from ~/.cache/clip/ViT-B-16.pt where OpenAI's clip package
keeps it; the default on an image folder) or clip:PATH (an OpenAI-format CLIP ViT state_dict or TorchScript file),
vit:PATH (a checkpoint of this project, or an official MAE / iBOT / BEiT-layout backbone), ema (an EMA copy of the
student; the default on the embedded and idx data, which no CLIP model fits).

  python dtm.py                                                  # embedded data, EMA teacher, CPU, minutes
  python dtm.py --teacher vit:out/mae/checkpoint.pt              # distil from this project's MAE encoder
  torchrun --nproc_per_node=8 dtm.py --data /path/to/imagenet    # paper recipe: ViT-B/16 from CLIP ViT-B/16,
                                                                 # 300 ep, batch 2048
  python dtm.py --help                                           # every knob, with its default

Deliberate differences from the official code (README "Equal to the official code"): the student is vit.py's ViT
with a learned absolute position embedding (official: BEiT's shared relative position bias); the token morphing is
ToMe without the class token the official call protects (every patch may merge; see morph_clusters); gradient
accumulation counts every micro-batch (the official loop keeps only the last one's gradient); the CLIP teacher gets
CLIP-normalised pixels (official: ImageNet-normalised); bf16 by default (official: fp16 with loss scaling).

Letters in shape comments: B batch, L patches, D student width, C teacher (target) width, M clusters,
W CLIP width.
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
import random
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

METHOD = 'dtm'

# -----------------------------------------------------------------------------
# config: typed defaults, one comment each (the comment is the flag's --help); 0 / '' / -1 = picked by --data


@dataclass
class Config:
    data: str = ''             # '' = embedded shapes; fashion-mnist | mnist | idx:DIR; or an image folder
    model: str = ''            # student ViT size: mini|tiny|small|base|large|huge
    img_size: int = 0          # input resolution in pixels
    patch_size: int = 0        # patch side in pixels; 0 on a folder = the model's own (16, 14 for huge)
    teacher: str = ''          # ema | vit:PATH | clip:PATH | clip (= ~/.cache/clip/ViT-B-16.pt); frozen, eval mode,
    #                            sees the unmasked view
    num_mask: int = 0          # masked patches per image, exactly; 0 = 75 of 196 scaled to the grid, round(75 L / 196)
    drop_path: float = 0.1     # student stochastic depth (linear in depth)
    layer_scale: float = 0.1   # student layer-scale init (BEiT)
    morph_levels: int = 2      # morphings per step with independent schedules; their losses are averaged
    morph_n: int = -1          # most tokens one morphing removes; -1 = all patches L; 0 = plain token-wise loss
    morph_k: int = 14          # most bipartite matching iterations per morphing
    morph_sampling: str = 'code'  # code: removed ~ U{0..n}, same r each iteration, even/odd split;
    #                               paper: remaining ~ U, removals spread exactly, random split (see morph_schedule)
    loss_type: str = 'smoothl1'  # distance between cluster means: smoothl1 | l1 | l2 | cosine
    beta: float = 2.0          # smooth L1 change point
    normalize_target: bool = False  # standardise each morphed target token over its channels
    ema_momentum: float = 0.0  # EMA teacher only: momentum at step 0, half cosine to 1 at the end
    epochs: int = 0            # pre-training epochs
    batch_size: int = 0        # per process (effective batch = batch_size * accum_iter * processes)
    accum_iter: int = 1        # gradient accumulation: micro-batches per optimizer step
    blr: float = 0.0           # base learning rate: lr = blr * sqrt(effective_batch / 2048) (BEiT v2 / DTM)
    lr: float = 0.0            # absolute learning rate; overrides blr when > 0
    min_lr: float = 1e-5       # end of the cosine schedule
    warmup_epochs: float = -1  # linear warm-up from 0, in epochs
    weight_decay: float = 0.05  # AdamW; none on biases, norms, [CLS] and position embeddings
    clip_grad: float = 3.0     # global gradient-norm clip; 0 = off
    out_dir: str = 'out/dtm'   # checkpoint.pt, log.jsonl
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
    compile: bool = False      # torch.compile the model (eager is what the tests run)
    seed: int = 0              # data order, augmentation, masks, morphing, drop path: pure functions of (seed, step)
    num_workers: int = -1      # loader workers per process, capped at the CPUs this process may use
    log_every: int = 20        # optimizer steps between log lines (the only host syncs)
    max_steps: int = 0         # stop after this many optimizer steps (0 = all epochs); the schedule is unchanged
    device: str = ''           # cuda|cuda:N|cpu; '' = cuda if available


# what 0 / '' / -1 resolve to: the embedded shapes (CPU, minutes), the small idx datasets (the README's CPU-scale
# Results protocol), an image folder (the paper's recipe: ViT-B/16, 300 epochs, effective batch 2048 on 8 GPUs)
REGIMES = {
    'embedded': dict(model='tiny', img_size=64, patch_size=8, epochs=1, batch_size=32, blr=1e-2, warmup_epochs=0.2,
                     num_workers=2, ema_momentum=0.99, teacher='ema',
                     knn_every=0, knn_train=100, knn_val=50, keep_every=0),
    'small': dict(model='mini', img_size=32, patch_size=4, epochs=1, batch_size=128, blr=5e-3, warmup_epochs=0.1,
                  num_workers=2, ema_momentum=0.99, teacher='ema',
                  knn_every=1, knn_train=1000, knn_val=500, keep_every=0),
    'folder': dict(model='base', img_size=224, patch_size=0, epochs=300, batch_size=256, blr=1.5e-3,
                   warmup_epochs=10, num_workers=10, ema_momentum=0.999, teacher='clip',
                   knn_every=1, knn_train=20000, knn_val=5000, keep_every=20),
}
ARCH_KEYS = ('model', 'img_size', 'patch_size', 'teacher')  # must match on resume
CLIP_DEFAULT = '~/.cache/clip/ViT-B-16.pt'  # --teacher clip: where OpenAI's clip package downloads ViT-B/16
LOSS_TYPES = ('smoothl1', 'l1', 'l2', 'cosine')


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
    """DTM's own checks, after the defaults are filled; error(msg) exits with the usage line."""
    L = (cfg.img_size // cfg.patch_size) ** 2
    cfg.num_mask = cfg.num_mask or round(75 * L / 196)
    cfg.morph_n = L if cfg.morph_n == -1 else cfg.morph_n
    if cfg.teacher == 'clip':  # the paper's teacher, where OpenAI's clip package keeps it (clip.load('ViT-B/16'))
        cfg.teacher = 'clip:' + os.path.expanduser(CLIP_DEFAULT)
    kind, _, path = cfg.teacher.partition(':')
    if not (cfg.teacher == 'ema' or (kind in ('vit', 'clip') and path)):
        error(f'--teacher must be ema, vit:PATH, clip or clip:PATH, got {cfg.teacher!r}')
    if not 0 < cfg.num_mask < L:
        error(f'--num_mask must be in [1, {L - 1}] for {L} patches, got {cfg.num_mask}')
    if not 0 <= cfg.morph_n <= L:
        error(f'--morph_n must be in [0, {L}] (or -1 = {L}), got {cfg.morph_n}')
    if cfg.morph_k < 1 or cfg.morph_levels < 1:
        error('--morph_k and --morph_levels must be at least 1')
    if cfg.morph_sampling not in ('code', 'paper'):
        error('--morph_sampling must be code or paper')
    if cfg.loss_type not in LOSS_TYPES:
        error(f'--loss_type must be one of {", ".join(LOSS_TYPES)}')

# -----------------------------------------------------------------------------
# recipe: augmentation and masking (official utils/datasets.py DataAugmentationForBEiT, masking_generator.py)


def dtm_transform(img_size, scale=(0.2, 1.0), normalize=True):
    """DTM / BEiT pre-training view (student and teacher see the same one): colour jitter (0.4, 0.4, 0.4),
    flip, RandomResizedCrop bicubic with scale (0.2, 1): BEiT v2's published --min_crop_scale 0.2, which the official
    DTM command leaves a placeholder (its code default is 0.08). normalize=False: uint8 out (to_device)."""
    return v2.Compose([v2.ToImage(), v2.ColorJitter(0.4, 0.4, 0.4), v2.RandomHorizontalFlip(),
                       v2.RandomResizedCrop(img_size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC,
                                            antialias=True)] + data._finish(normalize))


def exact_block_mask(h, w, num_masking, rng, min_patches=16):
    """BEiT v2 / DTM: blockwise mask, then random cells are added or removed so that exactly num_masking are
    masked. Returns bool (h, w)."""
    mask = data.block_mask(h, w, num_masking, rng, min_patches=min(min_patches, num_masking), max_patches=num_masking)
    flat = mask.reshape(-1)
    delta = num_masking - int(flat.sum())
    if delta > 0:
        flat[rng.choice(np.flatnonzero(~flat), delta, replace=False)] = True
    elif delta < 0:
        flat[rng.choice(np.flatnonzero(flat), -delta, replace=False)] = False
    return flat.reshape(h, w)


class MaskedView:
    """transform(img, rng) -> (view (3, S, S), mask (L,) bool with exactly num_mask True): one augmented view that
    student and teacher share (BEiT / DTM), and a BEiT block mask with an exact count drawn from the sample's rng."""

    def __init__(self, img_size, grid, num_mask):
        # crop scale (0.2, 1): BEiT v2's published --min_crop_scale 0.2 (the official DTM command leaves it blank)
        self.transform, self.grid, self.num_mask = dtm_transform(img_size, normalize=False), grid, num_mask

    def __call__(self, img, rng):
        mask = exact_block_mask(self.grid, self.grid, self.num_mask, rng)
        return self.transform(img), torch.from_numpy(mask.reshape(-1))

# -----------------------------------------------------------------------------
# model: BEiT-style student (mask token inside the encoder) + Linear head to the teacher's width (paper sec. 3)


def beit_trunc_normal_(t, std=0.02):
    """The official models' trunc_normal_(t, std) (BEiT v2 / DTM redefine it as timm's with a=-std, b=std): a normal
    cut at +-1 std, not at timm's default absolute bounds +-2, so the values drawn have std
    std * sqrt(1 - 2 phi(1) / (2 Phi(1) - 1)) = 0.54 std: 0.0108 for std 0.02. Drawn as timm draws it (inverse CDF of
    a uniform on [Phi(-1), Phi(1)]; torch's own trunc_normal_ rejection-samples, ~10x slower at this width)."""
    with torch.no_grad():
        edge = math.erf(1 / math.sqrt(2.0))  # 2 Phi(1) - 1
        return t.uniform_(-edge, edge).erfinv_().mul_(std * math.sqrt(2.0)).clamp_(-std, std)


class DTM(nn.Module):
    def __init__(self, cfg, target_dim=None):
        super().__init__()
        self.encoder = vit.vit(cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=0,
                               pos_embed='learned', mask_token=True, weight_init='trunc_normal',
                               layer_scale=cfg.layer_scale, drop_path_rate=cfg.drop_path)
        D = self.encoder.embed_dim
        self.head = nn.Linear(D, target_dim or D)  # the official lm_head, shared by all patch tokens
        # the official init (BEiT v2 / DTM _init_weights): every Linear and the patch conv, [CLS], the mask token, the
        # position embedding and the head drawn by beit_trunc_normal_ (std 0.0108 for 0.02), biases 0; then the
        # residual branch outputs of block i scaled by 1/sqrt(2 i) (fix_init_weight)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                beit_trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.encoder.cls_token, self.encoder.mask_token, self.encoder.pos_embed):
            beit_trunc_normal_(p, std=0.02)
        with torch.no_grad():
            for i, blk in enumerate(self.encoder.blocks, start=1):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * i))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * i))
        self.loss_type, self.beta, self.normalize_target = cfg.loss_type, cfg.beta, cfg.normalize_target

    def forward(self, imgs, mask, target, clusters):
        """imgs (B, 3, H, W), mask (B, L) bool (True = masked), target (B, L, C) teacher tokens, clusters: list of
        (assign (B, L), M) from morph_clusters -> loss averaged over the morphings."""
        pred = self.head(self.encoder.forward_features(imgs, mask)[:, 1:])  # (B, L, C), [CLS] dropped
        losses = [dtm_loss(pred, target, assign, M, self.loss_type, self.beta, self.normalize_target)
                  for assign, M in clusters]
        return sum(losses) / len(losses)

# -----------------------------------------------------------------------------
# teachers: frozen, eval mode, no grad; forward(imgs) -> patch tokens (B, L, C)


class ViTTeacher(nn.Module):
    """A ViT of vit.py (this project's checkpoints, official MAE / iBOT backbones, or the EMA copy of the student):
    patch tokens after the final norm."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.dim = encoder, encoder.embed_dim

    def forward(self, imgs):
        return self.encoder.forward_features(imgs)[:, 1:]  # (B, L, C)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def imagenet_to_clip():
    """(scale, shift), each (1, 3, 1, 1), with ImageNet-normalised pixels x -> CLIP-normalised x * scale + shift =
    (x * s_in + m_in - m_clip) / s_clip. (The official code feeds ImageNet-normalised pixels to CLIP as they are.)"""
    s_in, m_in, s_c, m_c = (torch.tensor(v).view(1, 3, 1, 1) for v in
                            (data.IMAGENET_STD, data.IMAGENET_MEAN, CLIP_STD, CLIP_MEAN))
    return s_in / s_c, (m_in - m_c) / s_c


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    """The parameters of nn.MultiheadAttention (in_proj_weight (3W, W), in_proj_bias, out_proj), computed with SDPA."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        B, N, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).reshape(B, N, 3, self.heads, W // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, W/heads) each
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, W))


class CLIPMlp(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj = nn.Linear(width, 4 * width), QuickGELU(), nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class CLIPBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(width), CLIPAttention(width, heads)
        self.ln_2, self.mlp = nn.LayerNorm(width), CLIPMlp(width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CLIPVisual(nn.Module):
    """OpenAI CLIP ViT image tower with the parameter names of its state_dict (conv1, class_embedding,
    positional_embedding, ln_pre, transformer.resblocks.{i}, ln_post, proj). forward: ImageNet-normalised
    pixels -> patch tokens after ln_post, projected to the joint space (B, L, C) -- the DTM target."""

    def __init__(self, width, layers, patch_size, grid, output_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(1 + grid * grid, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([CLIPBlock(width, width // 64) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))
        self.dim = output_dim
        scale, shift = imagenet_to_clip()  # buffers: moved to the device once, no host-to-device copy per step
        self.register_buffer('pix_scale', scale, persistent=False)
        self.register_buffer('pix_shift', shift, persistent=False)

    def forward(self, imgs):
        x = imgs * self.pix_scale.to(imgs.dtype) + self.pix_shift.to(imgs.dtype)  # CLIP's own pixel statistics
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, L, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1+L, W)
        x = self.ln_pre(x)
        for blk in self.transformer.resblocks:
            x = blk(x)
        return self.ln_post(x[:, 1:]) @ self.proj.to(x.dtype)  # (B, L, C), [CLS] dropped


def load_clip_visual(path, img_size, trust=False):
    """CLIPVisual from an OpenAI-format state_dict (full model with 'visual.' keys, or the visual tower alone);
    width, depth, patch and output width are read from the tensors, the position embedding is resized to img_size."""
    try:
        sd = vit.read_checkpoint(path, trust=trust)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'error: teacher {e}')
    sd = sd.get('state_dict', sd) if isinstance(sd, dict) else sd
    if isinstance(sd, dict) and any(k.startswith('visual.') for k in sd):
        sd = {k[len('visual.'):]: v for k, v in sd.items() if k.startswith('visual.')}
    if not isinstance(sd, dict) or not {'conv1.weight', 'positional_embedding', 'proj'} <= set(sd):
        sys.exit(f'error: {path} is not an OpenAI-format CLIP ViT state_dict '
                 '(no visual conv1 / positional_embedding / proj)')
    sd = {k: v.float() for k, v in sd.items() if torch.is_tensor(v) and k not in ('pix_scale', 'pix_shift')}
    width, _, p, _ = sd['conv1.weight'].shape
    layers = 1 + max((int(k.split('.')[2]) for k in sd if k.startswith('transformer.resblocks.')), default=-1)
    if img_size % p:
        sys.exit(f'error: --img_size {img_size} is not divisible by the CLIP patch size {p}')
    grid = img_size // p
    sd['positional_embedding'] = vit.interpolate_pos_embed(sd['positional_embedding'][None], (grid, grid))[0]
    model = CLIPVisual(width, layers, p, grid, sd['proj'].shape[1])
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        sys.exit(f'error: {path} does not match a CLIP ViT of width {width}, {layers} layers, patch {p}: '
                 + str(e).strip().splitlines()[-1].strip()[:300])
    return model


def build_teacher(cfg, student_encoder=None, verbose=True):
    """--teacher ema (a copy of student_encoder) | vit:PATH | clip:PATH (clip: CLIP_DEFAULT) -> frozen module in eval
    mode with .dim."""
    kind, _, path = cfg.teacher.partition(':')
    if kind == 'ema':
        teacher = ViTTeacher(copy.deepcopy(student_encoder))
    elif kind == 'vit':  # the ViT the file holds (size, patch, layer scale from its tensors), at the student's size
        try:
            enc, arch = vit.load_vit(path, img_size=cfg.img_size, num_classes=0, verbose=False,
                                     trust=cfg.trust_checkpoint)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f'error: teacher {e}')
        if enc.grid != cfg.img_size // cfg.patch_size:
            sys.exit(f"error: teacher patch size {arch['patch_size']} does not give the student's "
                     f"{cfg.img_size // cfg.patch_size}-wide grid at --img_size {cfg.img_size}; use --patch_size "
                     f"{arch['patch_size']}")
        lacks = [k for k in arch['missing'] if not k.startswith('norm.')]
        if lacks:
            sys.exit(f'error: teacher {path} lacks {", ".join(lacks[:4])}{" ..." if len(lacks) > 4 else ""}')
        if verbose:
            print(f"teacher: ViT-{arch['model']} patch {arch['patch_size']} from {path} ({arch['format']}); "
                  f"missing: {arch['missing'] or 'none'}")
        teacher = ViTTeacher(enc)
    else:
        if path == os.path.expanduser(CLIP_DEFAULT) and not os.path.isfile(path):
            sys.exit(f'error: --teacher clip: no CLIP ViT-B/16 at {path}; put OpenAI\'s ViT-B-16.pt there (the clip '
                     f'package\'s clip.load("ViT-B/16") downloads it there) or pass --teacher clip:PATH')
        teacher = load_clip_visual(path, cfg.img_size, cfg.trust_checkpoint)
    return teacher.requires_grad_(False).eval()


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
# token morphing (paper sec. 3.2, Algorithm 1) and loss


def morph_schedule(N, n, k, rng, sampling='code'):
    """Dynamic scheduler: one draw -> tokens merged at each matching iteration (list of ints), each capped at
    half the tokens left (one bipartite round removes at most its A side); N - sum = clusters left.
    code : removed ~ U{0..n}, iters ~ U{1..k}, r = ceil(removed / iters) (floor if r * iters > n), the same r
           every iteration (the official scheme: up to r * iters tokens go, more than `removed` when ceil rounds up)
    paper: remaining ~ U{max(1, N - n)..N}, iters ~ U{1..k}; the N - remaining removals spread evenly over the
           iterations, later ones taking what an earlier cap left, so exactly N - remaining go when the caps allow
    rng: random.Random."""
    t, rs = N, []
    if sampling == 'code':
        removed = rng.randint(0, n)
        iters = rng.randint(1, k)
        r = math.ceil(removed / iters)
        if r * iters > n:
            r = removed // iters
        for _ in range(iters):
            rs.append(min(r, t // 2))
            t -= rs[-1]
    else:
        left = N - rng.randint(max(1, N - n), N)
        iters = rng.randint(1, k)
        for p in range(iters):
            rs.append(min(math.ceil(left / (iters - p)), t // 2))
            t, left = t - rs[-1], left - rs[-1]
    return rs


def cluster_means(x, assign, M):
    """x (B, L, C), assign (B, L) cluster ids in [0, M) -> per-cluster means (B, M, C) (sizes from the assignment)."""
    B, L, C = x.shape
    sums = x.new_zeros(B, M, C).scatter_add_(1, assign[..., None].expand(-1, -1, C), x)  # (B, M, C)
    sizes = x.new_zeros(B, M).scatter_add_(1, assign, x.new_ones(B, L))  # (B, M)
    return sums / sizes[..., None]


@torch.no_grad()
def morph_clusters(x, rs, random_split=False):
    """Iterated bipartite soft matching (ToMe) on teacher tokens x (B, L, C), r = rs[p] merges at iteration p.
    Each iteration: unit-normalise the current cluster means, split them into A / B (alternate positions, or a
    random half per image with random_split), cosine scores A B^T, every A token picks its best B partner, the r
    A tokens with the highest scores join their partner's cluster. Returns (assign (B, L) long: the cluster of
    every original token, M = L - sum(rs) clusters, each non-empty). New order: kept A by descending score, then
    B (ToMe's bipartite_soft_matching with class_token=False; the order sets the next round's A / B split).
    Every token may merge: the official code runs ToMe with class_token=True on patch-only tensors, which keeps
    the top-left patch a singleton forever, caps a round at (t - 1) // 2 and re-sorts the kept A tokens by
    position (to keep that "class token" first); that quirk is not reproduced: this is ToMe without it."""
    B, L, _ = x.shape
    x = x.float()
    ar = torch.arange(L, device=x.device)
    assign = ar.expand(B, L).clone()  # (B, L): every token its own cluster
    t, feats = L, x
    for r in rs:
        if r == 0:
            continue
        if random_split:  # paper: random halves
            perm = torch.rand(B, t, device=x.device).argsort(dim=1)  # (B, t)
            a_idx, b_idx = perm[:, :t // 2], perm[:, t // 2:]
        else:  # official code (ToMe): even / odd positions
            a_idx, b_idx = ar[0:t:2].expand(B, -1), ar[1:t:2].expand(B, -1)
        ta, tb = a_idx.shape[1], b_idx.shape[1]
        metric = F.normalize(feats, dim=-1)  # (B, t, C)
        a = metric.gather(1, a_idx[..., None].expand(-1, -1, metric.shape[-1]))  # (B, ta, C)
        b = metric.gather(1, b_idx[..., None].expand(-1, -1, metric.shape[-1]))  # (B, tb, C)
        best, dst = (a @ b.transpose(1, 2)).max(dim=-1)  # (B, ta): best cosine score and its B partner
        order = best.argsort(dim=-1, descending=True, stable=True)  # (B, ta)
        src, keep = order[:, :r], order[:, r:]  # merged A / kept A, both by descending score (ToMe)
        new_id = torch.empty(B, t, dtype=torch.long, device=x.device)  # current cluster -> next cluster id
        new_id.scatter_(1, a_idx.gather(1, keep), ar[:ta - r].expand(B, -1))
        new_id.scatter_(1, a_idx.gather(1, src), ta - r + dst.gather(1, src))
        new_id.scatter_(1, b_idx, ta - r + ar[:tb].expand(B, -1))
        assign = new_id.gather(1, assign)  # (B, L)
        t -= r
        feats = cluster_means(x, assign, t)  # (B, t, C): size-weighted means of the merged clusters
    return assign, t


def morph_draws(L, rng, cfg):
    """cfg.morph_levels independent morph schedules for L tokens (lists of merges per matching iteration), drawn on
    the host from rng: data-independent, so they are part of the step's schedules."""
    return [morph_schedule(L, cfg.morph_n, cfg.morph_k, rng, cfg.morph_sampling) for _ in range(cfg.morph_levels)]


def token_distance(u, v, loss_type='smoothl1', beta=2.0):
    """Per-token distance (B, L) between (B, L, C) tensors: channel mean of smooth L1 (beta) / L1 / squared error,
    or 1 - cosine similarity."""
    if loss_type == 'smoothl1':
        return F.smooth_l1_loss(u, v, reduction='none', beta=beta).mean(dim=-1)
    if loss_type == 'l1':
        return (u - v).abs().mean(dim=-1)
    if loss_type == 'l2':
        return ((u - v) ** 2).mean(dim=-1)
    return 1.0 - F.cosine_similarity(u, v, dim=-1, eps=1e-6)


def dtm_loss(pred, target, assign, M, loss_type='smoothl1', beta=2.0, normalize_target=False):
    """L_DTM = (1/L) sum_c |c| d(mean_c pred, mean_c target), over every token (masked and visible), mean over B.
    pred (B, L, C) student, target (B, L, C) teacher, assign (B, L) cluster ids in [0, M). Written as the
    token-wise loss between the cluster means broadcast back to their member tokens, which weights each
    cluster by its size. fp32."""
    idx = assign[..., None].expand(-1, -1, pred.shape[-1])  # (B, L, C)
    u = cluster_means(pred.float(), assign, M).gather(1, idx)  # (B, L, C): each token holds its cluster's mean
    v = cluster_means(target.float(), assign, M).gather(1, idx)
    if normalize_target:
        v = (v - v.mean(dim=-1, keepdim=True)) / (v.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    return token_distance(u, v, loss_type, beta).mean()

# -----------------------------------------------------------------------------
# optimizer and schedules


def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases, norms (1-D params), [CLS] and position embeddings; the mask
    token is decayed (BEiT / DTM)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or n.endswith(('cls_token', 'pos_embed'))
        (no_decay if skip else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


def lr_at(step, base_lr, min_lr, warmup_steps, total_steps):
    """Per-step linear warm-up from 0, then half-cycle cosine to min_lr (MAE util/lr_sched.py)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def momentum_at(step, base, total_steps):
    """EMA momentum after optimizer step `step`: 1 - (1 - base) (1 + cos(pi step / T)) / 2, base at 0, 1 at T."""
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * min(step / max(1, total_steps), 1.0)))


def schedules(step, cfg, base_lr, warmup_steps, total_steps, rank=0):
    """Every scheduled value of optimizer step `step`: lr, the EMA momentum (an EMA teacher only: a frozen one is
    never updated, so it has none to log), and the morph schedules of each micro-batch (accum_iter x morph_levels
    lists, from an rng seeded by (seed, rank, step)); `clusters` is their mean number of clusters left, for the log."""
    rng = random.Random(step_seed(cfg.seed, rank, step))
    L = (cfg.img_size // cfg.patch_size) ** 2
    morph = [morph_draws(L, rng, cfg) for _ in range(cfg.accum_iter)]
    momentum = {'momentum': momentum_at(step, cfg.ema_momentum, total_steps)} if cfg.teacher == 'ema' else {}
    return {'lr': lr_at(step, base_lr, cfg.min_lr, warmup_steps, total_steps), **momentum,
            'clusters': sum(L - sum(rs) for m in morph for rs in m) / (cfg.accum_iter * cfg.morph_levels),
            'morph': morph}

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

STATS = ('loss', 'grad_norm')  # what train_step returns, summed on the device between log lines


def train_step(fwd, model, teacher, optimizer, scaler, autocast, batches, sched, cfg):
    """One optimizer step: on each micro-batch the teacher's tokens of the unmasked view, the step's morphings of
    them (the same clusters then average the student's tokens), the student on the masked view and L_DTM, backward
    (gradients accumulate; under DDP all-reduced on the last micro-batch only); then the clipped grad norm, the
    optimizer step, the scaler update and, with --teacher ema, the EMA of the teacher.
    batches: accum_iter x (imgs (B, 3, H, W), mask (B, L) bool) on the device. Returns STATS (on the device)."""
    for g in optimizer.param_groups:
        g['lr'] = sched['lr']
    loss_sum = 0.0
    for i, (imgs, mask) in enumerate(batches):
        with torch.no_grad(), autocast:
            target = teacher(imgs).float()  # (B, L, C) on the unmasked view
        clusters = [morph_clusters(target, rs, random_split=cfg.morph_sampling == 'paper')
                    for rs in sched['morph'][i]]  # morph_levels x (assign (B, L), M)
        ddp = getattr(fwd, '_orig_mod', fwd)  # the DDP module, also inside torch.compile's wrapper
        sync = ddp.no_sync() if isinstance(ddp, DDP) and i < len(batches) - 1 else nullcontext()
        with sync:
            with autocast:
                loss = fwd(imgs, mask, target, clusters)
            scaler.scale(loss / len(batches)).backward()
        loss_sum = loss_sum + loss.detach() / len(batches)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad or float('inf'))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if cfg.teacher == 'ema':
        ema_update(teacher.encoder, model.encoder, sched['momentum'])
    return torch.stack([loss_sum, grad_norm.float()])


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
    grid = cfg.img_size // cfg.patch_size
    dataset = data.Seeded(base, MaskedView(cfg.img_size, grid, cfg.num_mask), with_rng=True)
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
    base_lr = cfg.lr if cfg.lr > 0 else cfg.blr * math.sqrt(eff_batch / 2048)  # square-root rule (BEiT v2 / DTM)
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)

    # model, teacher (a plain module, never DDP-wrapped), optimizer
    file_teacher = None if cfg.teacher == 'ema' else build_teacher(cfg, verbose=master)
    model = DTM(cfg, file_teacher.dim if file_teacher else None).to(device)
    teacher = (file_teacher or build_teacher(cfg, model.encoder)).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=base_lr, betas=(0.9, 0.999),
                                  fused=device_type == 'cuda', foreach=device_type != 'cuda')
    stateful = {'model': model, 'optimizer': optimizer, 'scaler': scaler}  # what a checkpoint restores
    if cfg.teacher == 'ema':
        stateful['teacher'] = teacher
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
        print(f'encoder {vit.count_params(model.encoder) / 1e6:.2f}M params, '
              f'total {vit.count_params(model) / 1e6:.2f}M, '
              f'teacher {cfg.teacher} {vit.count_params(teacher) / 1e6:.2f}M ({teacher.dim}-d targets), '
              f'{len(base)} images, {steps_per_epoch} steps/epoch')
        data.warn_warmup(warmup_steps, end_step, f'--warmup_epochs {cfg.warmup_epochs:g}')
    # DDP first, then compile: dynamo splits the graph at DDP's buckets so the all-reduce overlaps backward
    fwd = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None) if ddp else model
    fwd = torch.compile(fwd) if cfg.compile else fwd
    if ddp:
        for t in teacher.state_dict().values():  # the EMA copy was taken from each rank's own init: use rank 0's
            dist.broadcast(t, 0)

    encoder = model.encoder  # what the checkpoint's 'encoder', the kNN monitor and the snapshots hold
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
                 'encoder': vit.backbone_state_dict(model.encoder)}
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
            _, ((imgs, mask), _) = next(stream)
            batches.append((data.to_device(imgs, device), mask.to(device, non_blocking=True)))  # uint8 -> normalised
        torch.manual_seed(step_seed(cfg.seed, rank, step))
        sched = schedules(step, cfg, base_lr, warmup_steps, total_steps, rank)
        stats_sum += train_step(fwd, model, teacher, optimizer, scaler, autocast, batches, sched, cfg)
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
