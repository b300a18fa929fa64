"""
lut.py -- LUT pre-training (Kim et al., ECCV 2024, "Learning with Unmasked Tokens Drives Stronger Vision
Learners"), one file: MAE plus a broader-contextualization loss on the unmasked tokens.

MAE's loss only touches masked tokens. LUT also pulls the pooled *unmasked* tokens of a masked view towards a
momentum encoder's pooled view of the *whole* image (the other view), so visible tokens carry global context.
Per image: two views, each its own simple resized crop and flip (shorter side to img_size, random crop with 4-px
padding), so they differ by their flips and by an offset of up to 8 px on a square image, more along the longer
side of a photo (up to 82 px on a 500x375 one at 224 px); view 1 has no colour augmentation, view 2 colour jitter
and one of grayscale / solarize / blur (official TwoGlobalViewAugmentation; --shared_crop true draws one crop for
both). One noise draw keeps patches ids_shuffle[:K] of view 1 and the disjoint ids_shuffle[K:2K] of view 2:
disjoint patch indices, each on its own view's grid, as in the official code (the crops are not aligned, so the
content is not exactly disjoint). The online encoder runs on both masked views; the MAE decoder and pixel loss on
view 1 only; q_v = predictor(head(mean of kept patch tokens)); a momentum (EMA) copy of encoder + head sees both
full views, z_v = head(mean of all patch tokens); L_BC = (d(q1, z2) + d(q2, z1)) / 2 with d(a, b) = 2 - 2 cos(a, b);
total = w_mae L_MAE + w_bc L_BC.
As the official main_lut.py / models_lut.py: lr = blr * sqrt(effective batch) / 4 (equal to MAE's linear rule at
batch 4096), xavier-uniform on every Linear (head and predictor included), weight decay on everything but biases
and 1-D params (the [CLS] and mask tokens are decayed).

  python lut.py                                               # embedded data, CPU: both losses fall
  torchrun --nproc_per_node=8 lut.py --epochs 400 --data /path/to/imagenet  # ViT-B/16, eff. batch 4096
  python lut.py --help                                        # every knob, with its default

Measured (2-core shared CPU under load ~4, OMP_NUM_THREADS=1, torch 2.14, fp32): `python lut.py --max_steps 40`
(tiny, 64 px, batch 64, lr 3e-4 after its 78-step warm-up) logs L_MAE 1.78 -> 1.03 and L_BC 1.84 -> 0.46 (means
over steps 1-10 and 31-40), 8-17 img/s.

BatchNorm in the online head and predictor uses the statistics of the whole global batch under DDP
(GlobalBatchNorm1d: an all-reduce, differentiable, on NCCL and gloo alike, as the official SyncBatchNorm does), so
N processes with batch B equal one process with batch N*B. Each view is normalised by itself (q1, q2: two calls).
The momentum branch is a plain module (never DDP-wrapped) in eval mode: its BN uses running statistics, EMA'd
from the online ones. Unlike the official code, where each rank's copy keeps that rank's own random init, it starts
from rank 0's weights on every rank (broadcast), as the online model does under DDP.

Letters in shape comments: B batch, L patches, K kept patches per view, D encoder width, Dd decoder width,
P pixels per patch (p*p*3), Dh head hidden width.
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

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.transforms import v2

import data
import vit

METHOD = 'lut'

# -----------------------------------------------------------------------------
# config: typed defaults, one comment each (the comment is the flag's --help); 0 / '' / -1 = picked by --data


@dataclass
class Config:
    data: str = ''             # '' = embedded shapes; fashion-mnist | mnist | idx:DIR; or an image folder
    model: str = ''            # ViT size: mini|tiny|small|base|large|huge
    img_size: int = 0          # input resolution in pixels
    patch_size: int = 0        # patch side in pixels; 0 on a folder = the model's own (16, 14 for huge)
    mask_ratio: float = 0.75   # fraction of patches removed per view; >= 0.5 so the two kept sets are disjoint
    norm_pix_loss: bool = True  # per-patch normalised pixel target (the recipe of every published model)
    decoder_dim: int = 0       # decoder width
    decoder_depth: int = 0     # decoder blocks
    decoder_heads: int = 0     # decoder attention heads
    crop: str = 'src'          # geometry of each view: src (simple resized crop, LUT recipe) or rrc
    shared_crop: bool = False  # one crop and flip for both views (colour differs only); recipe: one per view
    head_dim: int = 4096       # hidden width of the projection head and of the predictor (D -> head_dim -> D)
    ema_momentum: float = 0.996  # EMA momentum of the momentum encoder + head at step 0; half cosine to 1 at the end
    w_mae: float = 1.0         # weight of the reconstruction loss L_MAE
    w_bc: float = -1           # weight of the broader-contextualization loss L_BC; -1 = 1.0 up to small, 0.25 base+
    epochs: int = 0            # pre-training epochs
    batch_size: int = 0        # per process (effective batch = batch_size * accum_iter * processes)
    accum_iter: int = 0        # gradient accumulation: micro-batches per optimizer step
    blr: float = 0.0           # base learning rate: lr = blr * sqrt(effective_batch) / 4 (official main_lut.py)
    lr: float = 0.0            # absolute learning rate; overrides blr when > 0
    min_lr: float = 0.0        # end of the cosine schedule
    warmup_epochs: float = -1  # linear warm-up from 0, in epochs
    weight_decay: float = 0.05  # AdamW; none on biases and norms (1-D); [CLS] and mask tokens decayed (official)
    out_dir: str = 'out/lut'   # checkpoint.pt, log.jsonl, recon.png
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
    compile: bool = False      # torch.compile the model and the momentum branch (eager is what the tests run)
    seed: int = 0              # data order, augmentation, masks and drop path are pure functions of (seed, step)
    num_workers: int = -1      # loader workers per process, capped at the CPUs this process may use
    log_every: int = 20        # optimizer steps between log lines (the only host syncs)
    max_steps: int = 0         # stop after this many optimizer steps (0 = all epochs); the schedule is unchanged
    device: str = ''           # cuda|cuda:N|cpu; '' = cuda if available


# what 0 / '' / -1 resolve to: the embedded shapes (CPU, minutes), the small idx datasets (the README's CPU-scale
# Results protocol), an image folder (the paper's recipe: ViT-B/16, 1600 epochs, effective batch 4096 on 8 GPUs as
# the official command makes it, 128 per GPU x --accum_iter 4 (docs/PRETRAIN.md): the BatchNorm of the head and
# predictor normalises each view over one micro-batch, 128 x 8 = 1024 images, not 4096, and the momentum branch's
# running statistics are EMA'd from those)
REGIMES = {
    'embedded': dict(model='tiny', img_size=64, patch_size=8, decoder_dim=128, decoder_depth=2, decoder_heads=4,
                     epochs=8, batch_size=64, accum_iter=1, blr=1.5e-4, warmup_epochs=1, num_workers=2,
                     knn_every=0, knn_train=100, knn_val=50, keep_every=0),  # lr 3e-4 at batch 64
    'small': dict(model='mini', img_size=32, patch_size=4, decoder_dim=128, decoder_depth=2, decoder_heads=4,
                  epochs=1, batch_size=128, accum_iter=1, blr=1.5e-4, warmup_epochs=0.1, num_workers=2,
                  knn_every=1, knn_train=1000, knn_val=500, keep_every=0),
    'folder': dict(model='base', img_size=224, patch_size=0, decoder_dim=512, decoder_depth=8, decoder_heads=16,
                   epochs=1600, batch_size=128, accum_iter=4, blr=1.5e-4, warmup_epochs=40, num_workers=10,
                   knn_every=1, knn_train=20000, knn_val=5000, keep_every=20),
}
ARCH_KEYS = ('model', 'img_size', 'patch_size', 'decoder_dim', 'decoder_depth', 'decoder_heads', 'head_dim')


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
    """LUT's own checks, after the defaults are filled; error(msg) exits with the usage line."""
    if cfg.w_bc == -1:  # the LUT recipe: 1.0 for ViT-S, 0.25 for ViT-B (and larger)
        cfg.w_bc = 1.0 if cfg.model in ('mini', 'tiny', 'small') else 0.25
    if not 0.5 <= cfg.mask_ratio < 1.0:
        error(f'--mask_ratio must be in [0.5, 1) for LUT (the two views keep disjoint patch sets), '
              f'got {cfg.mask_ratio}')
    if int((cfg.img_size // cfg.patch_size) ** 2 * (1 - cfg.mask_ratio)) < 1:
        error(f'--mask_ratio {cfg.mask_ratio} keeps no patch of a {cfg.img_size // cfg.patch_size}^2 grid')
    if cfg.crop not in ('src', 'rrc'):
        error(f'--crop must be src or rrc, got {cfg.crop!r}')
    if not 0.0 <= cfg.ema_momentum <= 1.0 or cfg.w_mae < 0 or cfg.w_bc < 0 or cfg.head_dim < 1:
        error('--ema_momentum must be in [0, 1], --w_mae and --w_bc >= 0, --head_dim >= 1')

# -----------------------------------------------------------------------------
# recipe: augmentation (two views, as the official TwoGlobalViewAugmentation)


def src_crop(img_size):
    """Simple resized crop (DeiT-III / LUT): shorter side -> img_size, random crop with 4-px reflect pad, flip."""
    return v2.Compose([v2.ToImage(), v2.Resize(img_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.RandomCrop(img_size, padding=4, padding_mode='reflect'), v2.RandomHorizontalFlip()])


class LUTTransform:
    """Two views of one image, as the official LUT TwoGlobalViewAugmentation: each view draws its own geometry
    (SRC by default: shorter side -> img_size, random crop with 4-px reflect padding, flip, so the views differ by
    their flips and an offset of up to 8 px along the shorter side and up to 8 px plus the excess of the longer
    side along it: 8 px on a square image, 82 px on a 500x375 photo at 224 px; RRC with crop='rrc'). View 1 gets
    no colour augmentation (it is reconstructed); view 2 colour jitter (p 0.8) followed by one of grayscale /
    solarize / blur (asymmetric, BYOL-like). shared=True draws one geometry for both views (they then differ in
    colour only; not the recipe). Returns (view1, view2), uint8 with normalize=False (to_device)."""

    def __init__(self, img_size, crop='src', shared=False, normalize=True):
        if crop == 'src':
            self.geometry = src_crop(img_size)
        elif crop == 'rrc':
            self.geometry = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(
                img_size, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.RandomHorizontalFlip()])
        else:
            raise ValueError(f'--crop must be src or rrc, got {crop!r}')
        self.strong = v2.Compose([data.color_jitter(), v2.RandomChoice([
            v2.Grayscale(3), v2.RandomSolarize(128, p=1.0), data.gaussian_blur(1.0)])])
        self.finish = v2.Compose(data._finish(normalize)) if normalize else v2.Identity()
        self.shared = shared

    def __call__(self, img):
        g1 = self.geometry(img)  # uint8 (3, S, S)
        g2 = g1 if self.shared else self.geometry(img)  # the official code crops each view on its own
        return self.finish(g1), self.finish(self.strong(g2))

# -----------------------------------------------------------------------------
# model: MAE (ViT encoder on the kept patches + light decoder) + projection head and predictor; momentum branch


def random_masking(noise, mask_ratio):
    """Per-sample random masking by argsort of uniform noise (B, L), small noise = keep (models_mae.py).
    Returns ids_shuffle (B, L), ids_restore (B, L) (its inverse permutation) and K = int(L * (1 - mask_ratio));
    the kept patches are ids_shuffle[:, :K]."""
    L = noise.shape[1]
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, L): ascending noise, the first K are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L)
    return ids_shuffle, ids_restore, int(L * (1 - mask_ratio))


def mask_from_ids(ids_keep, L):
    """(B, K) kept indices -> (B, L) float mask in the original patch order, 0 = keep, 1 = remove."""
    mask = torch.ones(ids_keep.shape[0], L, device=ids_keep.device)
    return mask.scatter_(1, ids_keep, 0.0)


class AllReduceSum(torch.autograd.Function):
    """Sum over processes, differentiable: every rank's loss depends on every rank's input through the shared
    statistics, so the gradient of the sum is the sum of the gradients (DDP then averages, as for the loss)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics come from the global batch over all processes (what SyncBatchNorm
    does, which refuses CPU tensors): mean, then centred variance, each one differentiable all-reduce, in fp32.
    One process: plain BatchNorm1d. Eval mode: running statistics, no communication. Same state_dict as
    BatchNorm1d."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        x = x.float()  # (N, C)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        reduce = AllReduceSum.apply if world > 1 else (lambda t: t)
        n = x.shape[0] * world  # every process holds an equal batch (the sampler drops the remainder)
        mean = reduce(x.sum(0)) / n  # (C,)
        var = reduce(((x - mean) ** 2).sum(0)) / n  # (C,) biased, for normalising
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / max(n - 1, 1), self.momentum)  # unbiased, as BatchNorm
            self.num_batches_tracked += 1
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


def mlp(dim, hidden):
    """LUT head / predictor: Linear(D, Dh, no bias) -> BN -> ReLU -> Linear(Dh, D, no bias); no BN at the end."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), GlobalBatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim, bias=False))


class LUT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.encoder = vit.vit(cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=0)
        D, Dd, p = self.encoder.embed_dim, cfg.decoder_dim, cfg.patch_size
        self.patch_size, self.num_patches = p, self.encoder.num_patches
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(vit.sincos_pos_embed(Dd, self.encoder.grid)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList([vit.Block(Dd, cfg.decoder_heads) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.decoder_pred = nn.Linear(Dd, p * p * 3)
        self.head = mlp(D, cfg.head_dim)  # projection head: also in the momentum branch
        self.predictor = mlp(D, cfg.head_dim)  # online only
        # MAE init (models_mae.py; official models_lut.py applies it to the head and predictor too): xavier_uniform
        # on every Linear, zero bias, LN (1, 0), BN torch's default, tokens N(0, 0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules(), *self.head.modules(),
                  *self.predictor.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_encoder(self, imgs, ids_keep):
        """imgs (B, 3, H, W), ids_keep (B, K) -> latent (B, 1+K, D); the encoder never sees mask tokens."""
        return self.encoder.forward_kept(imgs, ids_keep)

    def forward_decoder(self, latent, ids_restore):
        """latent (B, 1+K, D), ids_restore (B, L) -> pred (B, L, P) in the original patch order."""
        x = self.decoder_embed(latent)  # (B, 1+K, Dd)
        B, L, K = x.shape[0], ids_restore.shape[1], x.shape[1] - 1
        x_ = torch.cat([x[:, 1:], self.mask_token.expand(B, L - K, -1)], dim=1)  # (B, L, Dd), shuffled order
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1+L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, L, P), [CLS] dropped

    def forward(self, view1, view2, noise, mask_ratio, norm_pix):
        """view1, view2 (B, 3, H, W), noise (B, L) -> (L_MAE, q1 (B, D), q2 (B, D), pred (B, L, P), mask (B, L) of
        view 1 with 1 = removed). Two encoder passes on the disjoint kept sets; only view 1 is decoded."""
        ids_keep1, ids_keep2, ids_restore = two_view_masks(noise, mask_ratio)  # (B, K), (B, K), (B, L)
        latent1 = self.forward_encoder(view1, ids_keep1)  # (B, 1+K, D)
        latent2 = self.forward_encoder(view2, ids_keep2)  # (B, 1+K, D)
        mask = mask_from_ids(ids_keep1, noise.shape[1])  # (B, L)
        pred = self.forward_decoder(latent1, ids_restore)  # only view 1 is reconstructed
        target = pixel_target(view1, self.patch_size, norm_pix)
        loss = mae_loss(pred, target, mask)
        q1 = self.predictor(self.head(pool_patches(latent1)))  # (B, D); BN sees each view's batch alone
        q2 = self.predictor(self.head(pool_patches(latent2)))  # (B, D)
        return loss, q1, q2, pred, mask


class Momentum(nn.Module):
    """The target branch: an EMA copy of the online encoder + head (not the predictor), on full unmasked views.
    Always in eval mode (its BN normalises with its EMA'd running statistics), no gradient, never DDP-wrapped."""

    def __init__(self, model):
        super().__init__()
        self.encoder, self.head = copy.deepcopy(model.encoder), copy.deepcopy(model.head)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, imgs):
        """imgs (B, 3, H, W) -> z (B, D): head of the mean of all L patch tokens after the final norm."""
        return self.head(pool_patches(self.encoder.forward_features(imgs)))


def tracked(model):
    """The online modules the momentum branch follows, in Momentum's parameter and buffer order."""
    return nn.ModuleDict({'encoder': model.encoder, 'head': model.head})


def two_view_masks(noise, mask_ratio):
    """One noise draw (B, L) for both views: view 1 keeps ids_shuffle[:, :K], view 2 the next K, so the two kept
    sets are disjoint (needs mask_ratio >= 0.5). Returns ids_keep1 (B, K), ids_keep2 (B, K), ids_restore (B, L)
    (the unshuffle of view 1, whose removed patches are everything but ids_keep1)."""
    if mask_ratio < 0.5:
        raise ValueError(f'LUT needs mask_ratio >= 0.5 so that the two views keep disjoint patches, got {mask_ratio}')
    ids_shuffle, ids_restore, K = random_masking(noise, mask_ratio)
    return ids_shuffle[:, :K], ids_shuffle[:, K:2 * K], ids_restore


def pool_patches(latent):
    """(B, 1+n, D) -> (B, D): mean over the patch tokens, [CLS] excluded (LUT pools patches, not [CLS])."""
    return latent[:, 1:].mean(dim=1)

# -----------------------------------------------------------------------------
# loss


def pixel_target(imgs, p, norm_pix):
    """Patchified pixels (B, L, P); with norm_pix each patch is (t - mean) / sqrt(var + 1e-6), unbiased var."""
    t = vit.patchify(imgs, p)
    if norm_pix:
        t = (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    return t


def mae_loss(pred, target, mask):
    """Per-patch MSE (B, L), averaged over the removed patches only (mask 1 = removed)."""
    loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # (B, L)
    return (loss * mask).sum() / mask.sum()


def bc_distance(a, b):
    """d(a, b) = 2 - 2 cos(a, b) = |a/|a| - b/|b||^2 per row: (B, D), (B, D) -> (B,), in fp32."""
    return 2 - 2 * (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def bc_loss(q1, q2, z1, z2):
    """L_BC: cross-view only, symmetric, mean over the batch: (d(q1, z2) + d(q2, z1)) / 2 (engines/engine_lut.py
    of the official code skips the same-view pairs)."""
    return 0.5 * (bc_distance(q1, z2).mean() + bc_distance(q2, z1).mean())

# -----------------------------------------------------------------------------
# optimizer and schedules


def param_groups(model, weight_decay):
    """AdamW groups as the official pre-training (timm add_weight_decay with no skip list): no weight decay on
    biases and 1-D params (norms); cls_token and mask_token are decayed. Frozen parameters (the fixed sin-cos
    position embeddings) are left out."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or n.endswith('.bias') else decay).append(p)
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


def schedules(step, cfg, base_lr, warmup_steps, total_steps):
    """Every scheduled value of optimizer step `step` (logged as they are)."""
    return {'lr': lr_at(step, base_lr, cfg.min_lr, warmup_steps, total_steps),
            'momentum': momentum_at(step, cfg.ema_momentum, total_steps)}

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

STATS = ('loss', 'loss_mae', 'loss_bc', 'grad_norm')  # what train_step returns, summed on the device between logs


def train_step(fwd, model, teacher, optimizer, scaler, autocast, batches, sched, cfg):
    """One optimizer step: on each micro-batch the online model on both masked views (L_MAE on view 1, q1, q2), the
    momentum branch on both full views (z1, z2), loss = w_mae L_MAE + w_bc L_BC, backward (gradients accumulate;
    under DDP all-reduced on the last micro-batch only); then the grad norm, the optimizer step, the scaler update
    and the EMA of the momentum branch. batches: accum_iter x (view1, view2 (B, 3, H, W), noise (B, L)) on the
    device. Returns STATS (on the device, no sync)."""
    for g in optimizer.param_groups:
        g['lr'] = sched['lr']
    stats = 0.0
    for i, (view1, view2, noise) in enumerate(batches):
        ddp = getattr(fwd, '_orig_mod', fwd)  # the DDP module, also inside torch.compile's wrapper
        sync = ddp.no_sync() if isinstance(ddp, DDP) and i < len(batches) - 1 else nullcontext()
        with sync:
            with autocast:
                loss_mae, q1, q2, _, _ = fwd(view1, view2, noise, cfg.mask_ratio, cfg.norm_pix_loss)
                z1, z2 = teacher(view1), teacher(view2)  # (B, D) each, full views, no grad
                loss_bc = bc_loss(q1, q2, z1, z2)
                loss = cfg.w_mae * loss_mae + cfg.w_bc * loss_bc
            scaler.scale(loss / len(batches)).backward()
        stats = stats + torch.stack([loss, loss_mae, loss_bc]).detach() / len(batches)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float('inf'))  # measured, not clipped (recipe)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    ema_update(teacher, tracked(model), sched['momentum'])
    return torch.cat([stats, grad_norm.float()[None]])


def unnormalize_prediction(pred, target, mask):
    """Norm-pix predictions back to pixels, for pictures only. pred, target (B, L, P), mask (B, L) 1 = removed ->
    (pred with each true patch's own mean and std: what the loss compares, but at a masked patch the model is not
    given them; pred with one mean and std per image, the averages of its visible patches' own: what it could know)."""
    mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6) ** 0.5  # (B, L, 1) each
    vis = 1 - mask[..., None]  # (B, L, 1)
    n = vis.sum(1, keepdim=True).clamp_min(1)  # (B, 1, 1)
    vis_mean, vis_std = (mean * vis).sum(1, keepdim=True) / n, (std * vis).sum(1, keepdim=True) / n  # (B, 1, 1)
    return pred * std + mean, pred * vis_std + vis_mean


@torch.no_grad()
def save_reconstructions(model, imgs, noise, cfg, path, step=0):
    """PNG rows: original | masked | prediction | prediction with the visible patches pasted. Under norm_pix_loss the
    predicted patches are un-normalised twice, side by side: with each true patch's mean and std (as the loss sees
    them, which shows the target's brightness and contrast, not the model's), and with the mean and std of the
    image's visible patches (what the model could know)."""
    model.eval()
    _, _, _, pred, mask = model(imgs, imgs, noise, cfg.mask_ratio, cfg.norm_pix_loss)
    p = cfg.patch_size
    target = vit.patchify(imgs, p)  # (B, L, P)
    m = mask[..., None]  # (B, L, 1)
    rows, titles = [target, target * (1 - m)], ['original', f'masked {cfg.mask_ratio:.0%}']
    preds = zip(unnormalize_prediction(pred, target, mask), (': true stats', ': visible stats')) \
        if cfg.norm_pix_loss else [(pred, '')]
    for pr, stats in preds:  # (B, L, P) in pixels
        rows += [pr, target * (1 - m) + pr * m]
        titles += ['pred.' + stats, 'pasted' + stats]
    rows = [data.denormalize(vit.unpatchify(r.float(), p)) for r in rows]
    grid = torch.stack(rows, dim=1).flatten(0, 1)  # (len(rows) B, 3, H, W): one image per row
    run = os.path.basename(os.path.normpath(cfg.out_dir))
    caption = (f'{METHOD} ViT-{cfg.model}/{p}' + (f' ({run})' if run != METHOD else '') + f', step {step}, val '
               'images; pasted = the prediction with the visible patches put back')
    if cfg.norm_pix_loss:  # the model predicts normalised patches: their mean and std come from elsewhere
        caption += ('\nnorm-pix: "true stats" un-normalises each predicted patch with the real patch\'s mean and '
                    'std, which the\nmodel is not given (the target shows through); "visible stats" with the mean '
                    'and std of the\nimage\'s visible patches, which the model could know')
    data.save_image_grid(grid, len(rows), path, titles, caption=caption)
    model.train()

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
        vis_base = data.build_dataset(cfg.data, 'val', cfg.img_size) if master else None
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'error: {e}')
    num_patches = (cfg.img_size // cfg.patch_size) ** 2
    views = LUTTransform(cfg.img_size, cfg.crop, shared=cfg.shared_crop, normalize=False)  # uint8
    dataset = data.Seeded(base, data.WithNoise(views, num_patches))
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
    base_lr = cfg.lr if cfg.lr > 0 else cfg.blr * math.sqrt(eff_batch) / 4  # square-root rule, official main_lut.py
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)

    # model, optimizer; the momentum branch starts as a copy of the online encoder + head (never DDP-wrapped)
    model = LUT(cfg).to(device)
    teacher = Momentum(model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=base_lr, betas=(0.9, 0.95),
                                  fused=device_type == 'cuda', foreach=device_type != 'cuda')
    stateful = {'model': model, 'teacher': teacher, 'optimizer': optimizer,
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
        print(f'encoder {vit.count_params(model.encoder) / 1e6:.2f}M params, '
              f'total {vit.count_params(model) / 1e6:.2f}M, '
              f'{len(base)} images, {steps_per_epoch} steps/epoch')
        data.warn_warmup(warmup_steps, end_step, f'--warmup_epochs {cfg.warmup_epochs:g}')
    # DDP first, then compile: dynamo splits the graph at DDP's buckets so the all-reduce overlaps backward
    fwd = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None) if ddp else model
    fwd = torch.compile(fwd) if cfg.compile else fwd
    if cfg.compile:
        teacher.compile()  # in place: parameter names (the EMA pairs them by name) and state_dict keys unchanged
    if ddp:
        for t in teacher.state_dict().values():  # DDP gave every rank rank 0's online model; same for its copy
            dist.broadcast(t, 0)

    # a fixed batch for the reconstruction picture
    vis_imgs = torch.stack([data.eval_transform(cfg.img_size)(vis_base[i][0]) for i in range(8)]).to(device) \
        if master else None
    vis_noise = torch.rand(8, num_patches, generator=torch.Generator().manual_seed(0)).to(device) if master else None

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
        recon = os.path.join(cfg.out_dir, 'recon.png')
        with exit_on_failed_write(recon, saved):
            save_reconstructions(model, vis_imgs, vis_noise, cfg, recon, step)

    # the loop: one optimizer step = accum_iter micro-batches
    model.train()
    stream = data.batches(loader, sampler, step * cfg.accum_iter)
    stats_sum = torch.zeros(len(STATS), device=device)  # summed on the device, read only on log steps
    t0, t_start, step_start = time.time(), time.time(), step
    while step < end_step:
        batches = []
        for _ in range(cfg.accum_iter):
            _, (((view1, view2), noise), _) = next(stream)
            batches.append((data.to_device(view1, device), data.to_device(view2, device),
                            noise.to(device, non_blocking=True)))  # uint8 views normalised on the device
        torch.manual_seed(step_seed(cfg.seed, rank, step))
        sched = schedules(step, cfg, base_lr, warmup_steps, total_steps)
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
              f'log.jsonl, recon.png\nnext: python {evaluator} --mode knn --checkpoint '
              f'{shlex.quote(os.path.join(cfg.out_dir, "checkpoint.pt"))}'
              f'{" --data " + shlex.quote(cfg.data) if cfg.data else ""}')
    if ddp:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
