"""
eval_seg.py -- semantic segmentation with a pre-trained ViT (the MAE / BEiT / iBOT ADE20K protocol), one file.

Four blocks of the pre-trained ViT (4, 6, 8, 12 of 12) become a 4-level feature pyramid (deconv 4x, deconv 2x,
identity, max-pool: strides p/4, p/2, p, 2p for patch size p), read by an UperNet head (pooling pyramid + FPN)
with an auxiliary FCN head; the whole network is fine-tuned with AdamW, layer-wise lr decay and a poly schedule,
then scored by single-scale sliding-window mIoU. `--head linear` is iBOT's linear protocol: frozen backbone, the
4 tapped blocks' patch tokens after the final norm concatenated, one 1x1 conv (no BatchNorm), upsampled. The
backbone is the one the checkpoint holds (vit.load_vit: width, depth, heads, patch, layer scale).

  python eval_seg.py --checkpoint out/mae/checkpoint.pt     # embedded shapes (11 classes), CPU, minutes
  python eval_seg.py --checkpoint none                      # same with a random-init backbone (the baseline)
  torchrun --nproc_per_node=8 eval_seg.py --checkpoint mae_pretrain_vit_base.pth \
      --data /path/to/ADEChallengeData2016                  # paper recipe: ViT-B/16, 512 px, 160k iters, batch 16
  python eval_seg.py --eval_only --resume out/seg/checkpoint.pt  # score a fine-tuned model again
  python eval_seg.py --help                                 # every knob, with its default

Data: '' = the embedded shapes with their masks (0 background, 1..10 the shapes); a folder in the ADE20K layout
(ADEChallengeData2016/{images,annotations}/{training,validation}, labels reduced by one, 0 -> ignore);
'voc:DIR' = a VOC-style folder (JPEGImages/*.jpg, SegmentationClassPNG/*.png palette PNGs, 255 = ignore).

As the published ADE20K numbers were made (MAE / BEiT / iBOT configs on mmseg): UperNet width 768 with a 256-wide
auxiliary FCN head; cross-entropy averaged over all pixels, ignored ones counting 0 (mmseg avg_non_ignore=False);
[CLS] and position embedding weight-decayed (the shared LayerDecayOptimizerConstructor never matches their
'backbone.'-prefixed names); training crops retried while one class covers 75% (cat_max_ratio), padded with the
mean colour / ignore after normalization; mmseg's additive brightness and multiplicative contrast; for an iBOT
checkpoint, out_with_norm (--out_norm 1) and lr 8e-5, and lr 8e-4 for the linear head (iBOT's README, ViT-B).

Deliberate differences from the official code (what and why):
- Photometric saturation and hue are torchvision's (a blend with the grey image; a float HSV hue shift) where
  mmseg scales S and shifts H in OpenCV's uint8 HSV: torchvision has no OpenCV HSV and the effect is the same kind.
- Resize: the shorter side to U[0.5, 2] x S (train) and to S (test); mmseg rescales to fit (4S, S) x ratio, which
  also caps the long side at 4x the short one: the same for every ADE20K image but panoramas beyond 4:1.
- Linear warm-up from 0 (mmseg: from 1e-6 of the lr); iBOT's ViT-S lr (3e-5) is not picked automatically: pass --lr.
- SyncBatchNorm in the heads only under CUDA DDP (gloo / CPU keeps plain BatchNorm, rank 0's statistics scored);
  bf16 autocast where the configs use apex / mmcv fp16.
- BEiT-style relative position bias is dropped when a checkpoint has one (this ViT has none; the loader says so).

Letters in shape comments: B batch, L patches, D width, C classes, h x w patch grid, H x W pixels, c head width.
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
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

METHOD = 'seg'
IGNORE = 255  # label of pixels that count neither in the loss nor in the metric

# -----------------------------------------------------------------------------
# config: typed defaults, one comment each (the comment is the flag's --help); 0 / '' / -1 = picked by --data


@dataclass
class Config:
    data: str = ''             # '' = embedded shapes; an ADE20K folder (ADEChallengeData2016 layout); voc:DIR
    checkpoint: str = ''       # pre-trained backbone (any format vit.load_backbone reads), or 'none' = random init
    model: str = ''            # mini|tiny|small|base|large|huge; '' = the checkpoint's (none: tiny embedded, base)
    img_size: int = 0          # training crop and sliding window; 0 = the checkpoint's on the embedded shapes (none:
    #                            64), 512 on a folder
    patch_size: int = 0        # 0 = the checkpoint's (none: 8 embedded, the model's own on a folder)
    head: str = 'upernet'      # upernet (fine-tune everything) | linear (iBOT's probe: frozen backbone, 1x1 conv on the
    #                            4 tapped blocks' normed patch tokens concatenated)
    layers: str = ''           # 1-based blocks feeding the pyramid, e.g. 4,6,8,12; '' = 4,6,8,12 scaled to the depth
    channels: int = 0          # UperNet width; 0 = 64 embedded, 768 folder (iBOT, MAE); auxiliary head min(256, half)
    aux_weight: float = 0.4    # weight of the auxiliary FCN head's loss on the stride-p level; 0 = no auxiliary head
    out_norm: int = -1         # 1 = the backbone's final LayerNorm on each tapped block (iBOT's out_with_norm), 0 = raw
    #                            outputs (MAE / BEiT); -1 = 1 for an iBOT / DINO checkpoint, else 0; the linear head: 1
    drop_path: float = 0.1     # stochastic depth of the backbone while fine-tuning (0 for the linear probe)
    iters: int = 0             # optimizer steps; 0 = 1500 embedded (about 5 epochs of shapes), 160000 folder
    batch_size: int = 0        # per process; 0 = 16 embedded, 2 folder (16 on 8 GPUs)
    accum_iter: int = 1        # gradient accumulation steps (effective batch = batch_size * accum_iter * world)
    lr: float = 0.0            # peak lr of the head (backbone layers get lr * layer_decay^k); 0 = 1e-3 embedded;
    #                            folder: 1e-4 (MAE), 8e-5 for an iBOT checkpoint, 8e-4 with --head linear (iBOT)
    min_lr: float = 0.0        # end of the poly schedule
    layer_decay: float = 0.65  # layer-wise lr decay: block i of a depth-N ViT gets decay^(N + 1 - i), the head 1
    warmup_iters: int = -1     # linear warm-up; -1 = 30 embedded, 1500 folder
    weight_decay: float = 0.05  # AdamW; none on biases, norms, tokens, position embeddings
    eval_every: int = 0        # steps between evaluations; 0 = only at the end (the recipe evaluates every 16000)
    eval_mode: str = 'slide'   # slide (img_size windows, overlapping logits averaged) | whole (the image at once)
    stride: int = 0            # sliding-window stride; 0 = 2/3 of img_size (341 at 512, as in the recipe)
    val_size: int = 0          # evaluate on the first N validation images; 0 = all
    eval_only: bool = False    # evaluate the model of --resume (or the loaded backbone) and exit
    out_dir: str = 'out/seg'   # checkpoint.pt, log.jsonl, seg.png
    resume: str = ''           # '' fresh, 'auto' = out_dir/checkpoint.pt if present, or a path
    trust_checkpoint: bool = False  # load a file that is more than data (its unpickling can run code); only if trusted
    save_every: int = 4000     # steps between checkpoints (always saved at the end)
    dtype: str = ''            # bf16|fp16|fp32; '' = bf16 on CUDA, fp32 on CPU
    compile: bool = False      # torch.compile the model
    seed: int = 0              # data order and augmentation are pure functions of (seed, epoch, index)
    num_workers: int = -1      # loader workers per process, capped at the CPUs this process may use
    log_every: int = 20        # steps between log lines (the only host syncs)
    max_steps: int = 0         # stop after this many optimizer steps (0 = run all iters); schedule unchanged
    device: str = ''           # cuda|cpu|cuda:N; '' = cuda if available


# what 0 / '' / -1 resolve to: the embedded shapes (CPU, minutes) or a segmentation folder (the recipe: UperNet,
# 512 px, 160k iterations, batch 16 on 8 GPUs). The small idx datasets have no masks: no regime here.
REGIMES = {
    'embedded': dict(model='tiny', img_size=64, patch_size=8, channels=64, iters=1500, batch_size=16, lr=1e-3,
                     warmup_iters=30, num_workers=2),
    'folder': dict(model='base', img_size=512, patch_size=0, channels=768, iters=160_000, batch_size=2, lr=0.0,
                   warmup_iters=1500, num_workers=8),
}
ARCH_KEYS = ('model', 'img_size', 'patch_size', 'head', 'layers', 'channels', 'aux_weight',
             'out_norm')  # must match on resume


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
    at 0 / '' / -1 are filled from the regime of --data (REGIMES)."""
    def boolean(s):
        if s.lower() not in ('1', 'true', 'yes', 'on', '0', 'false', 'no', 'off'):
            raise argparse.ArgumentTypeError(f'expected true or false, got {s!r}')
        return s.lower() in ('1', 'true', 'yes', 'on')
    helps = field_help(Config)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        picked = '; '.join(f'{r} {v[f.name]!r}' for r, v in REGIMES.items() if f.name in v)
        default = f'default {f.default!r}' + (f' = picked by --data: {picked}' if picked else '')
        kind = dict(type=boolean, nargs='?', const=True, metavar='BOOL') if f.type is bool else dict(type=f.type)
        p.add_argument(f'--{f.name}', default=f.default, help=f'{helps.get(f.name, "")} ({default})'.replace('%', '%%'),
                       **kind)  # a bare --compile means --compile true
    cfg = Config(**vars(p.parse_args(argv)))
    arch, trained = {}, {}  # the ViT the checkpoint holds, and the config of a nanoMIM checkpoint
    if cfg.checkpoint.lower() not in ('', 'none'):
        try:
            arch, trained = vit.pretrained_arch(cfg.checkpoint, trust=cfg.trust_checkpoint)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f'error: {e}')
    cfg.notes = []  # printed under the configuration line (not a flag)
    if not cfg.data and trained.get('data'):  # segmentation masks exist only for the embedded shapes, ADE20K, VOC
        cfg.notes.append(f'data: the embedded shapes with their masks; the checkpoint was pre-trained on --data '
                         f'{trained["data"]}, which has no segmentation masks here')
    regime = data.regime(cfg.data)
    if regime not in REGIMES:
        p.error(f'--data {cfg.data}: no segmentation masks there; use the embedded shapes, an ADE20K folder or voc:DIR')
    defaults = dict(REGIMES[regime])
    if arch:  # the checkpoint's ViT; on the embedded shapes at the resolution it was trained at (a folder keeps the
        # recipe's 512 px crop, to which the ADE20K protocol interpolates its 224 px backbones)
        defaults.update(model=arch['model'] or defaults['model'], patch_size=arch['patch_size'])
        if regime == 'embedded':
            defaults.update(img_size=arch['img_size'])
    for k, v in defaults.items():
        if getattr(cfg, k) == Config.__dataclass_fields__[k].default:  # left at its 'pick by data' default
            setattr(cfg, k, v)
    cfg.num_workers = data.default_workers(cfg.num_workers)
    if cfg.patch_size == 0:
        cfg.patch_size = vit.SIZES[cfg.model][3] if cfg.model in vit.SIZES else 16
    if cfg.model not in vit.SIZES:
        p.error(f'--model must be one of {", ".join(vit.SIZES)}')
    if cfg.img_size % cfg.patch_size:
        p.error(f'--img_size {cfg.img_size} is not divisible by --patch_size {cfg.patch_size}')
    if not cfg.checkpoint and not cfg.resume:
        p.error('--checkpoint is required: a pre-trained checkpoint, or none for a random-init backbone')
    if cfg.head not in ('upernet', 'linear') or cfg.eval_mode not in ('slide', 'whole'):
        p.error('--head must be upernet or linear, --eval_mode slide or whole')
    if cfg.out_norm not in (-1, 0, 1):
        p.error('--out_norm must be -1 (by checkpoint), 0 or 1')
    if cfg.head == 'upernet' and cfg.batch_size < 2:
        p.error('--batch_size must be >= 2: the UperNet pooling pyramid has BatchNorm on 1x1 maps')
    try:
        cfg.layers = ','.join(map(str, parse_layers(cfg.layers, vit.SIZES[cfg.model][1])))
    except ValueError as e:
        p.error(str(e))
    cfg.stride = cfg.stride or max(1, cfg.img_size * 2 // 3)
    if cfg.dtype not in ('', 'bf16', 'fp16', 'fp32'):
        p.error('--dtype must be bf16, fp16 or fp32')
    return cfg


def parse_layers(spec, depth):
    """'4,6,8,12' -> [4, 6, 8, 12]; '' -> ViT-B's blocks 4, 6, 8, 12 scaled to `depth` (8, 12, 16, 24 for 24)."""
    if not spec:
        return [max(1, round(depth * k / 12)) for k in (4, 6, 8, 12)]
    try:
        layers = [int(s) for s in spec.split(',')]
    except ValueError:
        raise ValueError(f'--layers must be 4 comma-separated block numbers, got {spec!r}') from None
    if len(layers) != 4 or layers != sorted(set(layers)) or not 1 <= layers[0] <= layers[-1] <= depth:
        raise ValueError(f'--layers must be 4 increasing block numbers in 1..{depth}, got {spec!r}')
    return layers

# -----------------------------------------------------------------------------
# data: image + mask pairs, one joint transform for both


def reduce_zero_label(mask):
    """ADE20K convention: label 0 ("other") -> ignore, every other label -1 (1..150 -> 0..149); ignore stays."""
    mask = mask.clone()
    ignore = (mask == 0) | (mask == IGNORE)
    mask -= 1
    mask[ignore] = IGNORE
    return mask


def load_mask(path):
    """Label PNG -> (H, W) int64 of class indices; palette ('P') and grayscale PNGs hold the indices themselves."""
    with open(path, 'rb') as f:
        m = Image.open(f)
        m.load()
    if m.mode not in ('P', 'L', 'I', 'I;16'):
        raise ValueError(f'label image {path} is mode {m.mode}; expected a palette or grayscale PNG of class indices')
    return torch.from_numpy(np.array(m).astype(np.int64))


class PairFolder(torch.utils.data.Dataset):
    """(image path, mask path) pairs -> ((uint8 Image (3, H, W), Mask (H, W) int64), index). Labels >= num_classes
    other than 255 are turned into ignore, with a warning naming the file."""

    def __init__(self, pairs, num_classes, classes, reduce_zero=False):
        self.pairs, self.num_classes, self.classes, self.reduce_zero = pairs, num_classes, classes, reduce_zero

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        img_path, mask_path = self.pairs[i]
        img = tv_tensors.Image(v2.functional.pil_to_tensor(data.load_rgb(img_path)))
        mask = load_mask(mask_path)
        if mask.shape != img.shape[-2:]:
            raise ValueError(f'{mask_path} is {tuple(mask.shape)}, its image {img_path} is {tuple(img.shape[-2:])}')
        if self.reduce_zero:
            mask = reduce_zero_label(mask)
        bad = (mask >= self.num_classes) & (mask != IGNORE)
        if bad.any():
            warnings.warn(f'{mask_path}: labels {mask[bad].unique().tolist()} >= {self.num_classes} classes '
                          'are ignored')
            mask[bad] = IGNORE
        return (img, tv_tensors.Mask(mask)), i


class ShapesSeg(torch.utils.data.Dataset):
    """The embedded shapes with their masks: 11 classes (background + 10 shapes), no ignore pixels."""

    def __init__(self, split, size):
        self.base = data.Shapes(split, size, with_mask=True)
        self.num_classes, self.classes = 1 + len(data.SHAPE_CLASSES), ('background',) + data.SHAPE_CLASSES

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, _, mask = self.base[i]
        return (img, mask), i


def _stems(folder, ext):
    return {os.path.splitext(f)[0]: os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(ext)}


def ade20k(root, split):
    """ADEChallengeData2016/{images,annotations}/{training,validation}: 150 classes after reduce-zero-label."""
    if os.path.isdir(os.path.join(root, 'ADEChallengeData2016')):
        root = os.path.join(root, 'ADEChallengeData2016')
    sub = {'train': 'training', 'val': 'validation'}[split]
    img_dir, ann_dir = os.path.join(root, 'images', sub), os.path.join(root, 'annotations', sub)
    if not (os.path.isdir(img_dir) and os.path.isdir(ann_dir)):
        raise FileNotFoundError(f'--data {root}: expected the ADE20K layout {{images,annotations}}/{sub}/ '
                                f'(or voc:DIR for a VOC-style folder)')
    imgs, anns = _stems(img_dir, ('.jpg', '.jpeg', '.png')), _stems(ann_dir, '.png')
    pairs = [(imgs[s], anns[s]) for s in sorted(imgs) if s in anns]
    if not pairs:
        raise ValueError(f'--data {root}: no image in images/{sub} has an annotation in annotations/{sub}')
    info, classes = os.path.join(root, 'objectInfo150.txt'), [f'class{i}' for i in range(150)]
    if os.path.exists(info):  # Idx Ratio Train Val Name, tab-separated; the first of the ';'-separated names
        with open(info) as f:
            rows = [line.rstrip('\n').split('\t') for line in f][1:]
        if len(rows) == 150 and min(map(len, rows)) >= 5:
            classes = [r[4].split(';')[0].strip() for r in rows]
    return PairFolder(pairs, 150, classes, reduce_zero=True)


VOC_CLASSES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
               'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train',
               'tvmonitor')


def voc(root, split):
    """JPEGImages/*.jpg + SegmentationClassPNG/*.png (or SegmentationClass/) palette PNGs, 255 = ignore; the split
    from ImageSets/Segmentation/{train,val}.txt if present, else every image; classes from class_names.txt if
    present (one name a line, background first), else the 21 of PASCAL VOC."""
    img_dir = os.path.join(root, 'JPEGImages')
    ann_dir = next((os.path.join(root, d) for d in ('SegmentationClassPNG', 'SegmentationClass')
                    if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(img_dir) or ann_dir is None:
        raise FileNotFoundError(f'--data voc:{root}: expected JPEGImages/ and SegmentationClassPNG/ '
                                '(or SegmentationClass/)')
    imgs, anns = _stems(img_dir, ('.jpg', '.jpeg', '.png')), _stems(ann_dir, '.png')
    split_file = os.path.join(root, 'ImageSets', 'Segmentation', f'{split}.txt')
    if os.path.exists(split_file):
        with open(split_file) as f:
            stems = [s.strip() for s in f if s.strip()]
        missing = [s for s in stems if s not in imgs or s not in anns]
        if missing:
            raise FileNotFoundError(f'{split_file}: {len(missing)} entries have no image or label, e.g. {missing[0]}')
    else:
        stems = sorted(s for s in imgs if s in anns)
    if not stems:
        raise ValueError(f'--data voc:{root}: no image in JPEGImages has a label PNG')
    classes = VOC_CLASSES
    names = os.path.join(root, 'class_names.txt')
    if os.path.exists(names):
        with open(names) as f:
            classes = tuple(s.strip() for s in f if s.strip())
    return PairFolder([(imgs[s], anns[s]) for s in stems], len(classes), classes)


def build_seg_dataset(spec, split, img_size):
    """The dataset named by --data; items ((Image, Mask), index); has .num_classes and .classes."""
    if spec in ('', 'shapes'):
        return ShapesSeg(split, img_size)
    kind, root = spec.split(':', 1) if spec.startswith(('voc:', 'ade:')) else ('ade', spec)
    if not os.path.isdir(root):
        raise FileNotFoundError(f'--data {spec}: folder {root} does not exist')
    return voc(root, split) if kind == 'voc' else ade20k(root, split)


class PhotoMetricDistortion:
    """mmseg PhotoMetricDistortion on a uint8 image (3, H, W), each step with probability 0.5: brightness + U(-32, 32)
    (additive), contrast x U(0.5, 1.5) (a plain product, not a blend with the mean), saturation x U(0.5, 1.5), hue
    + U{-18..18} OpenCV units (1/180 of a turn); contrast first or last at random. Brightness and contrast truncate
    to uint8 as mmseg's convert(); saturation and hue are torchvision's (a deliberate difference, file docstring)."""

    def __call__(self, img):
        coin = lambda: torch.rand(()).item() < 0.5
        convert = lambda x, alpha=1.0, beta=0.0: (x.float() * alpha + beta).clamp(0, 255).to(torch.uint8)
        if coin():
            img = convert(img, beta=torch.empty(()).uniform_(-32, 32).item())
        contrast_first = coin()  # mmseg mode 1: contrast before saturation and hue; mode 0: after them
        if contrast_first and coin():
            img = convert(img, alpha=torch.empty(()).uniform_(0.5, 1.5).item())
        if coin():
            img = v2.functional.adjust_saturation(img, torch.empty(()).uniform_(0.5, 1.5).item())
        if coin():
            img = v2.functional.adjust_hue(img, int(torch.randint(-18, 19, ())) / 180)
        if not contrast_first and coin():
            img = convert(img, alpha=torch.empty(()).uniform_(0.5, 1.5).item())
        return img


class SegTrainTransform:
    """mmseg's ADE20K training pipeline on (Image, Mask) -> (normalized float image (3, S, S), mask (S, S)):
    resize of the shorter side to U[0.5, 2] x S; a random crop of at most S x S, drawn again (up to 10 draws) while
    one class covers 75% or more of its labelled pixels (RandomCrop cat_max_ratio 0.75); flip; one geometry for
    both. Then photometric distortion and normalization of the image, and padding at the bottom / right to S x S
    with 0 after normalization (the mean colour) and the ignore label in the mask (mmseg Pad after Normalize)."""

    def __init__(self, img_size, ratio=(0.5, 2.0), cat_max_ratio=0.75):
        self.size, self.cat_max_ratio = img_size, cat_max_ratio
        self.resize = v2.RandomResize(int(ratio[0] * img_size), int(ratio[1] * img_size) + 1, antialias=True)
        self.flip = v2.RandomHorizontalFlip()
        self.photometric = PhotoMetricDistortion()
        self.finish = v2.Compose(data._to_tensor()[1:])

    def crop_box(self, mask):
        """(top, left, h, w) of the crop, drawn again while one class dominates (cat_max_ratio, above)."""
        H, W = mask.shape[-2:]
        h, w = min(self.size, H), min(self.size, W)
        for _ in range(10):
            top, left = int(torch.randint(H - h + 1, ())), int(torch.randint(W - w + 1, ()))
            labels, counts = mask[top:top + h, left:left + w].unique(return_counts=True)
            counts = counts[labels != IGNORE]
            if self.cat_max_ratio >= 1 or (len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum()):
                break
        return top, left, h, w

    def geometry(self, pair):
        """(Image, Mask) -> the resized, cropped, flipped pair, at most S x S (uint8 image, int64 mask)."""
        img, mask = self.resize(pair)
        top, left, h, w = self.crop_box(mask)
        crop = (tv_tensors.Image(img[..., top:top + h, left:left + w]),
                tv_tensors.Mask(mask[top:top + h, left:left + w]))
        return self.flip(crop)

    def __call__(self, pair):
        img, mask = self.geometry(pair)
        x = self.finish(tv_tensors.Image(self.photometric(img)))
        pad = (0, self.size - x.shape[-1], 0, self.size - x.shape[-2])
        return F.pad(x, pad, value=0.0), tv_tensors.Mask(F.pad(mask, pad, value=IGNORE))


class SegEvalTransform:
    """(Image, Mask) -> (normalized image with its shorter side resized to img_size, mask at its own size):
    predictions are scored at the label's resolution."""

    def __init__(self, img_size):
        self.image = v2.Compose([v2.Resize(img_size, antialias=True)] + data._to_tensor()[1:])

    def __call__(self, pair):
        return self.image(pair[0]), pair[1]


def collate_lists(batch):
    """Evaluation batches keep variable-size images apart: ((images list, masks list), indices)."""
    (imgs, masks), idx = zip(*[b[0] for b in batch]), [b[1] for b in batch]
    return (list(imgs), list(masks)), idx

# -----------------------------------------------------------------------------
# model: ViT blocks -> feature pyramid -> UperNet (PPM + FPN) + auxiliary FCN head, or a linear probe


def conv_bn_relu(cin, cout, k):
    """mmseg ConvModule: conv (no bias) + BatchNorm + ReLU, 'same' padding."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def tokens_to_map(t, h, w):
    """Block output (B, 1+L, D) -> patch feature map (B, D, h, w); [CLS] dropped."""
    B, _, D = t.shape
    return t[:, 1:].transpose(1, 2).reshape(B, D, h, w)


class FeaturePyramid(nn.Module):
    """Four same-stride ViT maps (B, D, h, w) -> (B, D, 4h, 4w), (B, D, 2h, 2w), (B, D, h, w), (B, D, h/2, w/2):
    deconv-BN-GELU-deconv, deconv, identity, max-pool (BEiT / MAE segmentation backbones)."""

    def __init__(self, dim):
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
                                 nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, stride=2)

    def forward(self, feats):
        return [self.up4(feats[0]), self.up2(feats[1]), feats[2], self.down2(feats[3])]


class UperHead(nn.Module):
    """UperNet (Xiao et al. 2018, mmseg UPerHead): pooling pyramid (scales 1, 2, 3, 6) on the coarsest level, FPN
    top-down path with lateral 1x1 and output 3x3 convs, all levels upsampled to the finest and fused.
    levels (B, D, h_i, w_i) x 4, finest first -> logits (B, C, h_0, w_0)."""

    def __init__(self, dim, channels, num_classes, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.ppm = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(dim, channels, 1))
                                  for s in pool_scales])
        self.ppm_out = conv_bn_relu(dim + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList([conv_bn_relu(dim, channels, 1) for _ in range(3)])
        self.fpn_out = nn.ModuleList([conv_bn_relu(channels, channels, 3) for _ in range(3)])
        self.fuse = conv_bn_relu(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, levels):
        top = levels[3]
        pooled = [F.interpolate(m(top), size=top.shape[-2:], mode='bilinear', align_corners=False) for m in self.ppm]
        lat = [conv(x) for conv, x in zip(self.lateral, levels[:3])] + [self.ppm_out(torch.cat([top] + pooled, 1))]
        for i in (3, 2, 1):  # top-down: each level gets the upsampled coarser one added
            up = F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode='bilinear', align_corners=False)
            lat[i - 1] = lat[i - 1] + up
        outs = [conv(x) for conv, x in zip(self.fpn_out, lat[:3])] + [lat[3]]  # (B, c, h_i, w_i) each
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode='bilinear', align_corners=False) for o in outs[1:]]
        return self.cls(self.dropout(self.fuse(torch.cat(outs, 1))))  # (B, C, h_0, w_0)


def fcn_head(dim, channels, num_classes):
    """Auxiliary head (mmseg FCNHead, one conv): (B, D, h, w) -> (B, C, h, w); the classifier is the last module."""
    return nn.Sequential(conv_bn_relu(dim, channels, 3), nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))


class Segmenter(nn.Module):
    """ViT backbone (built from cfg, or the pre-trained one vit.load_vit built from its checkpoint) + heads."""

    def __init__(self, cfg, num_classes, backbone=None):
        super().__init__()
        linear = cfg.head == 'linear'
        self.backbone = backbone if backbone is not None else vit.vit(
            cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=0,
            drop_path_rate=0.0 if linear else cfg.drop_path)
        D, self.patch_size, self.head = self.backbone.embed_dim, cfg.patch_size, cfg.head
        self.layers, self.out_norm = [int(s) for s in cfg.layers.split(',')], cfg.out_norm == 1
        if linear:  # iBOT configs/linear: frozen backbone; FCNHead num_convs 0, resize_concat of the 4 normed taps,
            self.out_norm = True  # dropout 0: one 1x1 conv on 4D channels, no BatchNorm
            self.cls = nn.Conv2d(len(self.layers) * D, num_classes, 1)
            self.pyramid = self.decode = self.aux = None
        else:
            self.pyramid = FeaturePyramid(D)
            self.decode = UperHead(D, cfg.channels, num_classes)
            aux_width = min(256, cfg.channels // 2)  # mmseg's FCNHead: 256 channels in the ADE20K UperNet configs
            self.aux = fcn_head(D, aux_width, num_classes) if cfg.aux_weight > 0 else None
        for m in self.modules():  # mmseg init: kaiming convs, classifiers N(0, 0.01)
            if isinstance(m, nn.Conv2d) and m is not self.backbone.patch_embed.proj:
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        for m in (self.cls if linear else self.decode.cls, self.aux[-1] if self.aux else None):
            if m is not None:
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        self.freeze_unused(linear)

    def freeze_unused(self, linear):
        """Parameters that get no gradient are frozen (DDP needs every trained parameter used): the whole backbone
        for the linear probe; otherwise blocks after the last tapped one, and the final norm unless out_norm.
        The position embedding (a fixed sin-cos table during MAE pre-training) is trained, as in MAE/BEiT
        fine-tuning."""
        bb = self.backbone
        if linear:
            bb.requires_grad_(False)
            return
        bb.pos_embed.requires_grad_(True)
        for blk in bb.blocks[max(self.layers):]:
            blk.requires_grad_(False)
        bb.norm.requires_grad_(self.out_norm)

    def features(self, x):
        """(B, 3, H, W) -> one (B, D, H/p, W/p) map per tapped block."""
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        outs = self.backbone.forward_intermediates(x, self.layers)  # (B, 1+L, D) each, raw block outputs
        if self.out_norm:
            outs = [self.backbone.norm(t) for t in outs]
        return [tokens_to_map(t, h, w) for t in outs]

    def forward(self, x):
        """(B, 3, H, W) -> (logits (B, C, H, W), auxiliary logits (B, C, H, W) while training with an aux head,
        else None)."""
        size = x.shape[-2:]
        if self.head == 'linear':
            with torch.no_grad():
                f = torch.cat(self.features(x), dim=1)  # (B, 4D, h, w)
            logits = self.cls(f)  # (B, C, h, w)
            return F.interpolate(logits, size=size, mode='bilinear', align_corners=False), None
        levels = self.pyramid(self.features(x))  # strides p/4, p/2, p, 2p
        logits = F.interpolate(self.decode(levels), size=size, mode='bilinear', align_corners=False)
        aux = None
        if self.aux is not None and self.training:
            aux = F.interpolate(self.aux(levels[2]), size=size, mode='bilinear', align_corners=False)
        return logits, aux

# -----------------------------------------------------------------------------
# loss and metric


def seg_loss(logits, target, aux=None, aux_weight=0.4):
    """Pixel cross-entropy (fp32) summed over the labelled pixels and divided by all pixels, ignored ones included
    (mmseg's CrossEntropyLoss default, avg_non_ignore=False, behind the published ADE20K numbers), plus the weighted
    auxiliary term. logits (B, C, H, W), target (B, H, W) with 255 = ignore."""
    n = target.numel()
    loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction='sum') / n
    if aux is not None:
        loss = loss + aux_weight * F.cross_entropy(aux.float(), target, ignore_index=IGNORE, reduction='sum') / n
    return loss


def confusion_matrix(pred, label, num_classes):
    """pred, label (...) int -> (C, C) int64 counts, rows = ground truth, columns = prediction; pixels labelled
    255 (or outside 0..C-1) are skipped. Runs on the tensors' device."""
    valid = (label >= 0) & (label < num_classes)
    idx = label[valid] * num_classes + pred[valid]
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def seg_metrics(cm):
    """Confusion matrix (C, C) -> mIoU, mAcc, aAcc (percent) and per-class IoU (C,) (percent, NaN for a class absent
    from both prediction and label, which the mean skips; a class predicted but absent from the labels scores 0)."""
    cm = cm.double()
    tp, gt, pred = cm.diag(), cm.sum(1), cm.sum(0)
    iou = tp / (gt + pred - tp)  # NaN where the union is empty
    acc = tp / gt  # NaN where the class has no labelled pixel
    return {'mIoU': 100 * iou.nanmean().item(), 'mAcc': 100 * acc.nanmean().item(),
            'aAcc': 100 * (tp.sum() / cm.sum().clamp(min=1)).item(), 'iou': (100 * iou).tolist()}

# -----------------------------------------------------------------------------
# inference


def window_starts(n, crop, stride):
    """Top (or left) edges of sliding windows along a side of n >= crop pixels: every `stride`, the last one flush
    with the far edge (mmseg slide_inference)."""
    steps = max(n - crop + stride - 1, 0) // stride + 1
    return [min(i * stride, n - crop) for i in range(steps)]


@torch.no_grad()
def predict(model, imgs, num_classes, cfg):
    """imgs (B, 3, H, W) -> logits (B, C, H, W) in fp32. slide: crop x crop windows, overlapping logits averaged;
    whole: the image at once, padded to a multiple of the patch size. Images smaller than the window are padded."""
    B, _, H, W = imgs.shape
    crop, p = cfg.img_size, cfg.patch_size
    if cfg.eval_mode == 'whole':
        x = F.pad(imgs, (0, -W % p, 0, -H % p))
        return model(x)[0].float()[..., :H, :W]
    x = F.pad(imgs, (0, max(crop - W, 0), 0, max(crop - H, 0)))
    Hp, Wp = x.shape[-2:]
    logits = torch.zeros(B, num_classes, Hp, Wp, device=imgs.device)
    count = torch.zeros(1, 1, Hp, Wp, device=imgs.device)
    for y in window_starts(Hp, crop, cfg.stride):
        for x0 in window_starts(Wp, crop, cfg.stride):
            logits[..., y:y + crop, x0:x0 + crop] += model(x[..., y:y + crop, x0:x0 + crop])[0].float()
            count[..., y:y + crop, x0:x0 + crop] += 1
    return (logits / count)[..., :H, :W]


def label_logits(logits, size):
    """Scores at the label's resolution: (B, C, H', W') -> (B, C, H, W), bilinear."""
    if logits.shape[-2:] == size:
        return logits
    return F.interpolate(logits, size=size, mode='bilinear', align_corners=False)


@torch.no_grad()
def evaluate(model, loader, num_classes, cfg, device, autocast):
    """Confusion matrix over this process's share of the validation set, summed over processes -> seg_metrics."""
    ddp = dist.is_available() and dist.is_initialized()
    if ddp:  # plain BN (gloo) drifts per rank: score with rank 0's running statistics, the ones its checkpoint holds
        for b in model.buffers():
            dist.broadcast(b, 0)
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    prog = data.Progress(f'eval ({cfg.eval_mode})', len(loader.sampler), enabled=not ddp or dist.get_rank() == 0)
    for (imgs, masks), _ in loader:
        same = len({(i.shape, m.shape) for i, m in zip(imgs, masks)}) == 1
        groups = [(torch.stack(imgs), torch.stack(masks))] if same else \
            [(i[None], m[None]) for i, m in zip(imgs, masks)]
        for x, y in groups:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                logits = predict(model, x, num_classes, cfg)
            cm += confusion_matrix(label_logits(logits, y.shape[-2:]).argmax(1), y, num_classes)
        prog.update(len(imgs))
    prog.close()
    model.train(was_training)
    if ddp:  # every process then holds the total
        dist.all_reduce(cm, op=dist.ReduceOp.SUM)
    return seg_metrics(cm), cm

# -----------------------------------------------------------------------------
# optimizer and schedules


def layer_id(name, depth):
    """Layer of a parameter for lr decay (BEiT / MAE): tokens, position and patch embedding 0, block i (0-based)
    i + 1, everything else (final norm, pyramid, heads) depth + 1."""
    if name.startswith('backbone.'):
        n = name[len('backbone.'):]
        if n.startswith(('cls_token', 'mask_token', 'pos_embed', 'patch_embed.')):
            return 0
        if n.startswith('blocks.'):
            return int(n.split('.')[1]) + 1
    return depth + 1


def param_groups(model, weight_decay, layer_decay, depth):
    """AdamW groups by (layer, decay): lr scale layer_decay^(depth + 1 - layer); no weight decay on biases and norms
    (1-D params). [CLS] and the position embedding are decayed, as in the BEiT / MAE / iBOT segmentation code: its
    LayerDecayOptimizerConstructor exempts names equal to 'pos_embed' / 'cls_token', which never match the
    'backbone.'-prefixed names."""
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1
        i = layer_id(n, depth)
        g = groups.setdefault((i, skip), {'params': [], 'weight_decay': 0.0 if skip else weight_decay,
                                          'lr_scale': layer_decay ** (depth + 1 - i)})
        g['params'].append(p)
    return list(groups.values())


def lr_at(step, base_lr, min_lr, warmup_steps, total_steps):
    """Poly decay (power 1) from base_lr to min_lr, 1 - step / total, times a linear warm-up from 0 (mmseg 'poly')."""
    lr = min_lr + (base_lr - min_lr) * (1 - min(step, total_steps) / total_steps)
    return lr * step / warmup_steps if step < warmup_steps else lr

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


def load_checkpoint(path, cfg, num_classes):
    """Load a checkpoint to resume from; refuses another method's, architecture's or label set's checkpoint."""
    try:
        ckpt = vit.safe_load(path, cfg.trust_checkpoint)  # weights only, unless --trust_checkpoint
    except ValueError as e:
        sys.exit(f'error: {e}')
    method = ckpt.get('method') if isinstance(ckpt, dict) else None
    if method != METHOD:
        sys.exit(f'error: {path} is {vit.checkpoint_kind(method)}, not {vit.checkpoint_kind(METHOD)}; '
                 'pre-trained backbones go to --checkpoint')
    old = ckpt['config']
    diff = [f'{k}={old.get(k)} (now {getattr(cfg, k)})' for k in ARCH_KEYS if old.get(k) != getattr(cfg, k)]
    if ckpt.get('num_classes') != num_classes:
        diff.append(f'{ckpt.get("num_classes")} classes (now {num_classes})')
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


def pretrained_backbone(cfg, verbose=True):
    """The backbone to start from, built as its checkpoint holds it (vit.load_vit: width, depth, heads, patch, layer
    scale; --model / --patch_size must match): --checkpoint's, or for a run that only resumes, the `encoder` of the
    checkpoint to resume; None = a random init (--checkpoint none). Then fills --out_norm -1 and --lr 0 from the
    pre-training method as their Config comments say (or from the resumed run's config)."""
    resume = os.path.join(cfg.out_dir, 'checkpoint.pt') if cfg.resume == 'auto' else cfg.resume
    own = cfg.checkpoint.lower() not in ('', 'none')
    backbone, method, old = None, None, {}
    kw = dict(img_size=cfg.img_size, model=cfg.model, patch_size=cfg.patch_size, num_classes=0,
              drop_path_rate=0.0 if cfg.head == 'linear' else cfg.drop_path)
    try:
        if own:
            backbone, arch = vit.load_vit(cfg.checkpoint, verbose=verbose, trust=cfg.trust_checkpoint, **kw)
            method = arch['method']
        elif resume and os.path.isfile(resume):  # unreadable or foreign files: load_checkpoint says why
            ckpt = vit.read_checkpoint(resume, trust=cfg.trust_checkpoint)
            if isinstance(ckpt, dict) and ckpt.get('method') == METHOD and 'encoder' in ckpt:
                backbone, _ = vit.load_vit(ckpt, verbose=False, **kw)
                old = ckpt.get('config') or {}
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'error: {vit.as_flags(e)}')
    if cfg.out_norm == -1:
        cfg.out_norm = old.get('out_norm', 1 if method == 'ibot' else 0)
    if cfg.lr == 0:
        cfg.lr = old.get('lr') or (8e-4 if cfg.head == 'linear' else 8e-5 if method == 'ibot' else 1e-4)
    return backbone


def palette():
    """(256, 3) uint8 PASCAL VOC colour map (bits of the class index spread over R, G, B): 0 black, 255 (ignore)
    cream."""
    i, pal = np.arange(256), np.zeros((256, 3), dtype=np.int64)
    for j in range(8):  # bit 3j + k of the index -> bit 7 - j of channel k
        for k in range(3):
            pal[:, k] |= ((i >> (3 * j + k)) & 1) << (7 - j)
    return pal.astype(np.uint8)


@torch.no_grad()
def save_predictions(model, items, num_classes, classes, cfg, device, path, caption=''):
    """PNG rows: image | prediction | ground truth, labels coloured with the VOC palette, each at img_size x
    img_size, under `caption`; a key from colour to class name below, for every label shown (255: ignore)."""
    was_training = model.training
    model.eval()
    colours = palette()
    pal, S, tiles, shown = torch.from_numpy(colours).to(device), cfg.img_size, [], set()
    for img, mask in items:
        img, mask = img[None].to(device), mask[None].to(device)
        pred = label_logits(predict(model, img, num_classes, cfg), mask.shape[-2:]).argmax(1)  # (1, H, W)
        for lab in (pred, mask):
            shown.update(lab.unique().tolist())
            rgb = pal[lab.clamp(0, 255)].permute(0, 3, 1, 2).float() / 255  # (1, 3, H, W)
            tiles.append(F.interpolate(rgb, size=(S, S), mode='nearest'))
        tiles.insert(-2, F.interpolate(data.denormalize(img), size=(S, S), mode='bilinear', align_corners=False))
    key = [(classes[c] if c < len(classes) else 'ignore' if c == IGNORE else str(c), colours[min(c, 255)])
           for c in sorted(shown)]
    data.save_image_grid(torch.cat(tiles), 3, path, ('image', 'prediction', 'ground truth'), caption=caption, key=key)
    model.train(was_training)

# -----------------------------------------------------------------------------
# training


def build_data(cfg, env):
    """The train / val sets (val: the first --val_size images) with their joint transforms, and their loaders."""
    try:
        base = build_seg_dataset(cfg.data, 'train', cfg.img_size)
        val = build_seg_dataset(cfg.data, 'val', cfg.img_size)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'error: {e}')
    if cfg.val_size > 0:
        val = torch.utils.data.Subset(val, range(min(cfg.val_size, len(val))))
    dataset = data.Seeded(base, SegTrainTransform(cfg.img_size))
    val_set = data.Seeded(val, SegEvalTransform(cfg.img_size))
    try:
        loader, sampler = data.make_loader(dataset, cfg.batch_size, env.world, env.rank, cfg.seed, cfg.num_workers)
    except ValueError as e:
        regime = data.regime(cfg.data)
        sys.exit(f'error: {e} (the {regime} regime picks {REGIMES[regime]["batch_size"]})')
    val_loader, _ = data.make_loader(val_set, cfg.batch_size, env.world, env.rank, cfg.seed, cfg.num_workers,
                                     train=False, collate_fn=collate_lists)
    return SimpleNamespace(base=base, val=val, val_set=val_set, num_classes=base.num_classes, loader=loader,
                           sampler=sampler, val_loader=val_loader)


def build_model(cfg, env, backbone, num_classes):
    """The Segmenter on `backbone`, AdamW with layer-wise lr decay, and the state of --resume.
    Returns (model, optimizer, step)."""
    model = Segmenter(cfg, num_classes, backbone).to(env.device)
    depth = len(model.backbone.blocks)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.layer_decay, depth), lr=cfg.lr,
                                  betas=(0.9, 0.999), fused=env.device_type == 'cuda',
                                  foreach=env.device_type != 'cuda')
    step = 0
    resume = os.path.join(cfg.out_dir, 'checkpoint.pt') if cfg.resume == 'auto' else cfg.resume
    if resume and not (cfg.resume == 'auto' and not os.path.exists(resume)):
        ckpt = load_checkpoint(resume, cfg, num_classes)
        restore(ckpt, {'model': model, 'optimizer': optimizer, 'scaler': env.scaler})
        step = ckpt['step']
        if env.master:
            print(f'resumed from {resume} at step {step}')
        del ckpt
    elif cfg.checkpoint.lower() == 'none':
        if env.master:
            print('backbone: random initialisation (--checkpoint none)')
    elif not cfg.checkpoint:
        sys.exit(f'error: no checkpoint to resume in {cfg.out_dir}; give --checkpoint PATH or --checkpoint none')
    return model, optimizer, step


def last_step(cfg):
    """The step this run stops at: --max_steps cuts it short of --iters, the schedule still spans --iters."""
    return min(cfg.iters, cfg.max_steps) if cfg.max_steps > 0 else cfg.iters


def print_config(cfg, env, model, sets):
    """Rank 0's first lines: the configuration as resolved, the model and data sizes, notes, a too long warm-up."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    print(json.dumps({'method': METHOD, **dataclasses.asdict(cfg), 'world': env.world, 'device': env.device,
                      'dtype': env.dtype, 'effective_batch': cfg.batch_size * cfg.accum_iter * env.world,
                      'lr': cfg.lr, 'steps': cfg.iters, 'num_classes': sets.num_classes}))
    print(f'backbone {vit.count_params(model.backbone) / 1e6:.2f}M params, '
          f'total {vit.count_params(model) / 1e6:.2f}M '
          f'({vit.count_params(model, trainable=True) / 1e6:.3g}M trained), {len(sets.base)} train / {len(sets.val)} '
          f'val images, {sets.num_classes} classes, {cfg.head} head on blocks {model.layers}')
    for note in cfg.notes:
        print(note)
    data.warn_warmup(cfg.warmup_iters, last_step(cfg), f'--warmup_iters {cfg.warmup_iters}')


def report(cfg, env, model, sets, step, metrics):
    """Rank 0 prints mIoU / mAcc / aAcc and the per-class IoU, logs them, and draws seg.png."""
    if not env.master:
        return
    names = sets.base.classes
    per_class = ', '.join(f'{names[c]} {v:.1f}' for c, v in enumerate(metrics['iou']) if not math.isnan(v))
    print(f"eval step {step}: mIoU {metrics['mIoU']:.2f} mAcc {metrics['mAcc']:.2f} aAcc {metrics['aAcc']:.2f} "
          f"({len(sets.val)} images, {cfg.eval_mode})\nper-class IoU: {per_class}", flush=True)
    with open(os.path.join(cfg.out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps({'step': step, **metrics}) + '\n')
    caption = (f"step {step}, mIoU {metrics['mIoU']:.2f} on {len(sets.val)} val images ({cfg.eval_mode})\n"
               + f'{cfg.head} head, {cfg.checkpoint or "resumed"}'[-60:])
    save_predictions(model, sets.vis_items, sets.num_classes, names, cfg, env.device,
                     os.path.join(cfg.out_dir, 'seg.png'), caption)


def train(cfg, env, model, fwd, optimizer, step, sets):
    """The loop from `step`: one optimizer step = accum_iter micro-batches; logs, checkpoints and evaluations on
    their cadences, always at the last step."""
    ddp, master, device, scaler = env.ddp, env.master, env.device, env.scaler
    steps_per_epoch = max(1, sets.sampler.batches_per_epoch() // cfg.accum_iter)
    end_step = last_step(cfg)
    eff_batch = cfg.batch_size * cfg.accum_iter * env.world

    def checkpoint():
        state = {'method': METHOD, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                 'scaler': scaler.state_dict(), 'step': step, 'epoch': step / max(1, steps_per_epoch),
                 'config': dataclasses.asdict(cfg), 'num_classes': sets.num_classes,
                 'encoder': vit.backbone_state_dict(model.backbone)}
        save_checkpoint(os.path.join(cfg.out_dir, 'checkpoint.pt'), state)

    model.train()
    stream = data.batches(sets.loader, sets.sampler, step * cfg.accum_iter)
    loss_sum = torch.zeros((), device=device)  # summed on the device, read only on log steps
    bad = torch.zeros((), device=device)  # any non-finite loss since the last check
    t0, t_start, step_start = time.time(), time.time(), step
    while step < end_step:
        torch.manual_seed(step_seed(cfg.seed, env.rank, step))  # in-step randomness: a function of (seed, rank, step)
        lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.iters)
        for g in optimizer.param_groups:
            g['lr'] = lr * g['lr_scale']
        for micro in range(cfg.accum_iter):
            # a new loader iterator (as after a resume) draws its base seed from the global RNG: keep that draw out
            # of the step's dropout / drop path
            with torch.random.fork_rng(devices=[]):
                _, ((imgs, masks), _) = next(stream)
            imgs, masks = imgs.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            sync = nullcontext() if (not ddp or micro == cfg.accum_iter - 1) else fwd.no_sync()
            with sync:
                with env.autocast:
                    logits, aux = fwd(imgs)
                loss = seg_loss(logits, masks, aux, cfg.aux_weight)
                scaler.scale(loss / cfg.accum_iter).backward()
            loss_sum += loss.detach() / cfg.accum_iter
            bad = torch.maximum(bad, (~torch.isfinite(loss.detach())).float())
        log_now = (step + 1) % cfg.log_every == 0 or step + 1 == end_step
        if log_now:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float('inf'))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        save_now = step % cfg.save_every == 0 or step == end_step
        if log_now or save_now:
            if ddp:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item():  # the only place a non-finite loss is looked for: never saved
                print(f'error: non-finite loss by step {step} (loss {loss.item():.4g}); nothing saved', file=sys.stderr)
                sys.exit(2)
        if log_now:
            n = step - step_start
            if ddp:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            dt = time.time() - t0
            ips = n * eff_batch / dt
            eta = (end_step - step) * dt / n
            rec = {'step': step, 'epoch': round(step / steps_per_epoch, 3), 'loss': loss_sum.item() / n, 'lr': lr,
                   'grad_norm': grad_norm.item(), 'img_per_s': ips, 'eta_min': eta / 60}
            if master:
                print(f"step {step}/{end_step} ep {rec['epoch']:.2f} loss {rec['loss']:.4f} lr {lr:.2e} "
                      f"gnorm {rec['grad_norm']:.3f} {ips:.1f} img/s eta {eta / 60:.1f} min", flush=True)
                with open(os.path.join(cfg.out_dir, 'log.jsonl'), 'a') as f:
                    f.write(json.dumps(rec) + '\n')
            loss_sum.zero_()
            t0, step_start = time.time(), step
        if save_now and master:
            checkpoint()
        if (cfg.eval_every > 0 and step % cfg.eval_every == 0) or step == end_step:
            report(cfg, env, model, sets, step, evaluate(model, sets.val_loader, sets.num_classes, cfg, device,
                                                         env.autocast)[0])
            t0 = time.time()  # evaluation time is not training throughput
    if master:
        print(f'done: {step} steps in {(time.time() - t_start) / 60:.1f} min; wrote {cfg.out_dir}/checkpoint.pt, '
              f'log.jsonl, seg.png')


def main(argv=None):
    cfg = get_config(argv)

    ddp, rank, local_rank, world, device = setup_distributed(cfg)
    master = rank == 0
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    dtype, autocast, scaler = setup_precision(cfg, device_type)

    env = SimpleNamespace(ddp=ddp, rank=rank, world=world, master=master, device=device, device_type=device_type,
                          dtype=dtype, autocast=autocast, scaler=scaler)
    backbone = pretrained_backbone(cfg, master)  # fills --out_norm / --lr from the pre-training method
    sets = build_data(cfg, env)
    model, optimizer, step = build_model(cfg, env, backbone, sets.num_classes)
    if master:
        print_config(cfg, env, model, sets)
    if ddp and device_type == 'cuda':  # the heads' BatchNorm sees 2 images per GPU in the recipe: statistics over all
        # GPUs (in place, same parameters); gloo/CPU keeps plain BN
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    fwd = torch.compile(model) if cfg.compile else model
    if ddp:
        fwd = DDP(fwd, device_ids=[local_rank] if device_type == 'cuda' else None)
    sets.vis_items = [sets.val_set[i][0] for i in range(min(4, len(sets.val_set)))] if master else None  # seg.png

    if cfg.eval_only:
        report(cfg, env, model, sets, step, evaluate(model, sets.val_loader, sets.num_classes, cfg, device,
                                                     autocast)[0])
    else:
        train(cfg, env, model, fwd, optimizer, step, sets)
    if ddp:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
