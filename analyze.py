"""
analyze.py -- the measurements and pictures used to compare MIM encoders, for one or several checkpoints.

  aad       average attention distance per layer and head (ViT paper fig. 7; LUT's attention-span figure):
            for every patch query, the attention-weighted mean pixel distance to the patch keys, averaged over
            queries and images. Table per layer, PNG with one dot per head (layer on x, pixels on y).
  attn      attention maps of one layer (default the last) for the [CLS] query, or for one patch query, per head,
            overlaid on the images (PNG grid, one file per checkpoint).
  spectrum  per-layer singular values of the feature covariance (log10), table and PNG (LUT, Jing et al. 2022).
  recon     MAE / LUT reconstructions of masked images, for checkpoints that hold a decoder.

  python analyze.py --checkpoint none --checkpoint out/mae/checkpoint.pt --what all   # embedded data, CPU
  python analyze.py --data /path/to/imagenet --what aad --layers 10,11,12 \\
      --checkpoint out/mae/checkpoint.pt --checkpoint out/lut/checkpoint.pt          # LUT's AAD figure, IN-1K val
  python analyze.py --help                                                            # every knob

--checkpoint is repeatable; 'none' is a randomly initialised ViT of the same shape as the first real checkpoint.
Every checkpoint is measured on the same images at the same resolution, so tables are side by side and plots
are overlaid. Outputs go to --out_dir: report.md (every table), results.json, aad.png, spectrum.png,
attn_<label>.png, recon.png.

Letters in shape comments: B batch, H heads, L patches, D width, P pixels per patch (p*p*3), S image side.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

import data
import vit

WHAT = ('aad', 'attn', 'spectrum', 'recon')

# -----------------------------------------------------------------------------
# config: typed defaults, one comment each; 0 / '' = pick by checkpoint, then by data (embedded or folder)


@dataclass
class Config:
    what: str = 'aad'          # comma list of aad|attn|spectrum|recon, or 'all'
    checkpoint: list = field(default_factory=list)  # repeatable: a path, or 'none' (random init); default: none
    data: str = ''             # image folder (ImageNet layout: DIR/val/<class>/*.jpg) or '' for the embedded shapes
    split: str = 'val'         # split of --data the images come from
    model: str = ''            # mini|tiny|small|base|large|huge; '' = the checkpoint's (config, else weights)
    img_size: int = 0          # analysis resolution (AAD pixels); 0 = first checkpoint's, else 64 embedded / 224
    patch_size: int = 0        # 0 = the checkpoint's; for 'none' alone 8 embedded, the model's own on a folder
    num_images: int = 128      # images evenly spaced over the split (the ViT paper's AAD used 128)
    batch_size: int = 16       # images per forward pass (attention maps of all layers are held at once)
    layers: str = ''           # comma list of 1-based blocks in the AAD table and plot; '' = all (LUT: last three)
    cls_key: str = 'renorm'    # AAD: drop the [CLS] key, renormalise over patch keys; 'zero' = [CLS] at distance 0
    attn_layer: int = 0        # 1-based block drawn by --what attn; 0 = the last
    attn_query: int = -1       # -1 = the [CLS] query; k >= 0 = patch k (row-major) as the query (LUT motivation fig.)
    spectrum_tokens: str = 'patch'  # covariance over all patch tokens, or 'mean' = one mean-pooled vector per image
    num_vis: int = 8           # images in the attention and reconstruction pictures
    mask_ratio: float = 0.0    # recon; 0 = the checkpoint's own (0.75 when it does not say)
    out_dir: str = 'out/analyze'  # report.md, results.json and the PNGs
    seed: int = 0              # random init of 'none' and the reconstruction masks
    num_workers: int = -1      # loader workers; -1 = 0 embedded, 8 folder
    device: str = ''           # cuda|cpu|cuda:N; '' = cuda if available


EMBEDDED = dict(model='tiny', img_size=64, patch_size=8, num_workers=0)
RECIPE = dict(model='base', img_size=224, patch_size=0, num_workers=8)


def get_config(argv=None):
    """argparse from the dataclass (unknown flags rejected); data-dependent defaults are filled in main()
    because they depend on the checkpoints."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.name == 'checkpoint':
            p.add_argument('--checkpoint', action='append', default=None, metavar='PATH|none',
                           help='repeatable (default: none = one random-init ViT)')
        else:
            p.add_argument(f'--{f.name}', type=f.type, default=f.default, help=f'(default {f.default!r})')
    cfg = Config(**vars(p.parse_args(argv)))
    cfg.checkpoint = cfg.checkpoint or ['none']
    cfg.what = ','.join(WHAT) if cfg.what == 'all' else cfg.what
    bad = [w for w in cfg.what.split(',') if w not in WHAT]
    if bad:
        p.error(f'--what {",".join(bad)}: choose from {", ".join(WHAT)} or all')
    if cfg.model and cfg.model not in vit.SIZES:
        p.error(f'--model must be one of {", ".join(vit.SIZES)}')
    try:
        cfg.layer_list = [int(s) for s in cfg.layers.split(',') if s.strip()]
    except ValueError:
        p.error(f'--layers must be a comma list of block numbers, got {cfg.layers!r}')
    if cfg.cls_key not in ('renorm', 'zero'):
        p.error('--cls_key must be renorm or zero')
    if cfg.spectrum_tokens not in ('patch', 'mean'):
        p.error('--spectrum_tokens must be patch or mean')
    if cfg.num_images < 1 or cfg.batch_size < 1 or cfg.num_vis < 1:
        p.error('--num_images, --batch_size and --num_vis must be at least 1')
    if not 0.0 <= cfg.mask_ratio < 1.0:
        p.error(f'--mask_ratio must be in [0, 1), got {cfg.mask_ratio}')
    return cfg

# -----------------------------------------------------------------------------
# checkpoints: architecture, encoder, decoder


def read_checkpoint(path):
    """'none' -> None; a path -> the loaded dict. One error line when it is missing or unreadable."""
    if path == 'none':
        return None
    if not os.path.exists(path):
        sys.exit(f'error: checkpoint {path} does not exist')
    try:
        ckpt = vit.read_checkpoint(path)
    except ValueError as e:
        sys.exit(f'error: {e}')
    if not isinstance(ckpt, dict):
        sys.exit(f'error: {path} is not a checkpoint dict')
    return ckpt


def checkpoint_label(path, ckpt, taken):
    """Short name for tables and legends: 'random' for none, method:step for nanoMIM checkpoints, else the file
    stem; made unique."""
    if ckpt is None:
        label = 'random'
    elif ckpt.get('method'):
        label = f"{ckpt['method']}:{ckpt['step']}" if 'step' in ckpt else ckpt['method']
    else:
        label = os.path.splitext(os.path.basename(path))[0]
    base, i = label, 2
    while label in taken:
        label, i = f'{base}-{i}', i + 1
    return label


def build_encoder(ckpt, model, img_size, patch_size, seed):
    """A ViT (num_classes=0) at the analysis resolution: random init from `seed` for None, else the checkpoint's
    backbone through vit.load_vit (the architecture it holds, layer scale included). Eval mode."""
    torch.manual_seed(seed)
    if ckpt is None:
        return vit.vit(model, img_size=img_size, patch_size=patch_size, num_classes=0).eval()
    return vit.load_vit(ckpt, img_size=img_size, model=model, patch_size=patch_size, num_classes=0,
                        verbose=False)[0].eval()


def build_reconstructor(ckpt, img_size):
    """mae.MAE holding the checkpoint's encoder and pixel decoder, or None when the checkpoint has no decoder.
    Accepts the nanoMIM layout (encoder.*, decoder_*; MAE and LUT share it) and the official MAE layout (bare
    encoder keys; decoder heads are not in the weights, the official 16 is assumed)."""
    sd = ckpt.get('model') if ckpt is not None else None
    if not isinstance(sd, dict) or 'decoder_pred.weight' not in sd:
        return None
    import mae
    sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}
    if not any(k.startswith('encoder.') for k in sd):  # official MAE: encoder keys at the top level
        sd = {('encoder.' + k if k.startswith(vit.BACKBONE_PREFIXES) else k): v for k, v in sd.items()}
    model_name, p = (vit.checkpoint_arch(ckpt)[k] for k in ('model', 'patch_size'))
    c = ckpt.get('config') or {}
    depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('decoder_blocks.'))
    mcfg = SimpleNamespace(model=model_name, img_size=img_size, patch_size=p, decoder_depth=depth,
                           decoder_dim=sd['decoder_embed.weight'].shape[0], decoder_heads=c.get('decoder_heads', 16))
    model = mae.MAE(mcfg)
    for k in ('encoder.pos_embed', 'decoder_pos_embed'):  # trained at another resolution: resize the grids
        if k in sd:
            sd[k] = vit.interpolate_pos_embed(sd[k], (model.encoder.grid, model.encoder.grid))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise ValueError(f'checkpoint decoder does not match the MAE layout (missing {", ".join(missing[:4])})')
    model.load_state_dict({k: sd[k] for k in own})
    model.norm_pix = bool(c.get('norm_pix_loss', c.get('norm_pix', True)))
    model.mask_ratio = float(c.get('mask_ratio', 0.75))
    return model.eval()

# -----------------------------------------------------------------------------
# measurements: pure functions of tensors


def patch_distances(grid_h, grid_w, patch_size):
    """Euclidean distance in pixels between the centres of every pair of patches: (L, L), L = grid_h * grid_w,
    patches in row-major order (the order of vit.PatchEmbed)."""
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing='ij')
    pos = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1).double()  # (L, 2)
    return torch.cdist(pos, pos) * patch_size


def attention_distance(attn, dist, cls_key='renorm'):
    """Average attention distance of each image and head: attn (B, H, 1+L, 1+L) softmax maps ([CLS] first),
    dist (L, L) pixels -> (B, H). Queries are the L patches ([CLS] has no position); for each query the distance
    is sum_k w[q, k] * dist[q, k] over patch keys k, then averaged over queries. cls_key='renorm': w are the
    patch-key weights renormalised to sum 1 (the span of the attention among patches, whatever goes to [CLS]);
    'zero': w as they are, i.e. the [CLS] key counts with distance 0."""
    w = attn[:, :, 1:, 1:].double()  # (B, H, L, L): patch queries x patch keys
    if cls_key == 'renorm':
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return (w * dist.to(w.device)).sum(dim=-1).mean(dim=-1)  # (B, H)


def feature_moments(feats):
    """(N, D) features -> (N, sum (D,), sum of outer products (D, D)) in float64, summable over batches."""
    f = feats.double()
    return f.shape[0], f.sum(dim=0), f.T @ f


def covariance_spectrum(n, s1, s2):
    """Singular values (D,), descending, of the unbiased covariance built from summed moments."""
    mean = s1 / n
    cov = (s2 - n * torch.outer(mean, mean)) / max(1, n - 1)  # (D, D)
    return torch.linalg.svdvals(cov)


def effective_rank(sv):
    """exp of the entropy of the normalised singular values (Roy & Vetterli 2007): D for a flat spectrum, 1 for one
    direction."""
    p = sv.double().clamp_min(0) / sv.double().clamp_min(0).sum()
    return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))


def query_attention(attn, query):
    """Attention of one query over the patch keys: attn (B, H, 1+L, 1+L), query -1 = [CLS] or a patch index ->
    (B, H, L), renormalised over the patch keys."""
    row = attn[:, :, 0 if query < 0 else 1 + query, 1:].float()  # (B, H, L)
    return row / row.sum(dim=-1, keepdim=True).clamp_min(1e-30)


@torch.no_grad()
def reconstruct(model, imgs, noise, mask_ratio):
    """imgs (B, 3, S, S) normalised, noise (B, L) -> (masked input, reconstruction with the visible patches pasted),
    both (B, 3, S, S) normalised. Under norm_pix each predicted patch is un-normalised with the true patch's mean
    and std (the usual way to look at norm-pix models; it leaks the masked patches' first two moments)."""
    _, pred, mask = model(imgs, noise, mask_ratio, model.norm_pix)  # pred (B, L, P), mask (B, L) 1 = removed
    p = model.patch_size
    target = vit.patchify(imgs, p)  # (B, L, P)
    if model.norm_pix:
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    m = mask[..., None]  # (B, L, 1)
    return vit.unpatchify(target * (1 - m), p), vit.unpatchify(target * (1 - m) + pred.float() * m, p)

# -----------------------------------------------------------------------------
# drawing on tensors: a canvas is (3, H, W) floats in [0, 1]; x to the right, y down

PALETTE = torch.tensor([[0.12, 0.47, 0.71], [1.00, 0.50, 0.05], [0.17, 0.63, 0.17], [0.84, 0.15, 0.16],
                        [0.58, 0.40, 0.74], [0.55, 0.34, 0.29], [0.89, 0.47, 0.76], [0.50, 0.50, 0.50]])
BLACK, GREY = torch.zeros(3), torch.full((3,), 0.85)
GLYPHS = {  # 3 x 5 pixel font, rows top to bottom
    '0': '111101101101111', '1': '010110010010111', '2': '111001111100111', '3': '111001111001111',
    '4': '101101111001001', '5': '111100111001111', '6': '111100111101111', '7': '111001010010010',
    '8': '111101111101111', '9': '111101111001111', 'A': '010101111101101', 'B': '110101110101110',
    'C': '011100100100011', 'D': '110101101101110', 'E': '111100110100111', 'F': '111100110100100',
    'G': '011100101101011', 'H': '101101111101101', 'I': '111010010010111', 'J': '001001001101010',
    'K': '101101110101101', 'L': '100100100100111', 'M': '101111111101101', 'N': '110101101101101',
    'O': '010101101101010', 'P': '110101110100100', 'Q': '010101101110011', 'R': '110101110101101',
    'S': '011100010001110', 'T': '111010010010010', 'U': '101101101101111', 'V': '101101101101010',
    'W': '101101111111101', 'X': '101101010101101', 'Y': '101101010010010', 'Z': '111001010100111',
    '.': '000000000000010', '-': '000000111000000', '_': '000000000000111', '/': '001001010100100',
    ':': '000010000010000', '(': '010100100100010', ')': '010001001001010', '=': '000111000111000',
    '+': '000010111010000', ' ': '000000000000000', '?': '111001010000010'}


def fill_rect(c, x0, y0, x1, y1, color):
    """Fill the pixels x0 <= x < x1, y0 <= y < y1 (clipped to the canvas)."""
    x0, x1 = max(0, int(x0)), min(c.shape[2], int(x1))
    y0, y1 = max(0, int(y0)), min(c.shape[1], int(y1))
    if x0 < x1 and y0 < y1:
        c[:, y0:y1, x0:x1] = color.view(3, 1, 1)


def draw_dot(c, x, y, r, color):
    """Filled disk of radius r pixels centred on (x, y)."""
    x0, y0 = max(0, int(math.floor(x - r))), max(0, int(math.floor(y - r)))
    x1, y1 = min(c.shape[2], int(math.ceil(x + r)) + 1), min(c.shape[1], int(math.ceil(y + r)) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = torch.meshgrid(torch.arange(y0, y1), torch.arange(x0, x1), indexing='ij')
    inside = (xx - x) ** 2 + (yy - y) ** 2 <= r * r  # (h, w)
    c[:, y0:y1, x0:x1] = torch.where(inside, color.view(3, 1, 1), c[:, y0:y1, x0:x1])


def draw_line(c, x0, y0, x1, y1, color, width=1):
    """Segment from (x0, y0) to (x1, y1), `width` pixels thick, by dense sampling."""
    n = int(2 * max(abs(x1 - x0), abs(y1 - y0))) + 2
    t = torch.linspace(0, 1, n)
    for d in range(width):
        xs = (x0 + t * (x1 - x0)).round().long() + (d if abs(y1 - y0) > abs(x1 - x0) else 0)
        ys = (y0 + t * (y1 - y0)).round().long() + (0 if abs(y1 - y0) > abs(x1 - x0) else d)
        ok = (xs >= 0) & (xs < c.shape[2]) & (ys >= 0) & (ys < c.shape[1])
        c[:, ys[ok], xs[ok]] = color.view(3, 1)


def text_width(text, scale=2):
    return 4 * scale * len(text) - scale


def draw_text(c, x, y, text, color=BLACK, scale=2):
    """Upper-case text in the 3 x 5 font, top-left corner at (x, y), each font pixel scale x scale."""
    for i, ch in enumerate(str(text).upper()):
        g = torch.tensor([b == '1' for b in GLYPHS.get(ch, GLYPHS['?'])]).view(5, 3)
        g = g.repeat_interleave(scale, 0).repeat_interleave(scale, 1)  # (5 s, 3 s)
        gx, gy = int(x) + 4 * scale * i, int(y)
        h, w = min(g.shape[0], c.shape[1] - gy), min(g.shape[1], c.shape[2] - gx)
        if h > 0 and w > 0 and gx >= 0 and gy >= 0:
            region = c[:, gy:gy + h, gx:gx + w]
            c[:, gy:gy + h, gx:gx + w] = torch.where(g[:h, :w], color.view(3, 1, 1), region)


def nice_ceil(v):
    """Smallest of 1, 2, 2.5, 5 x 10^k that is >= v (axis limits)."""
    if v <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(v))
    return next(m * e for m in (1, 2, 2.5, 5, 10) if m * e >= v - 1e-12)


def fmt_tick(v):
    return f'{v:.0f}' if abs(v - round(v)) < 1e-9 else f'{v:.1f}'


def draw_legend(c, labels, x, y, scale=2):
    """One coloured square and name per checkpoint, left to right from (x, y)."""
    for i, label in enumerate(labels):
        fill_rect(c, x, y, x + 5 * scale, y + 5 * scale, PALETTE[i % len(PALETTE)])
        draw_text(c, x + 7 * scale, y, label, scale=scale)
        x += 7 * scale + text_width(label, scale) + 6 * scale


def draw_axes(c, box, ylim, yticks, scale=2):
    """Frame box (x0, y0, x1, y1), horizontal grid lines with labels at `yticks`; returns y -> pixel row."""
    x0, y0, x1, y1 = box
    to_y = lambda v: y1 - (v - ylim[0]) / (ylim[1] - ylim[0]) * (y1 - y0)  # noqa: E731
    for v in yticks:
        draw_line(c, x0, to_y(v), x1, to_y(v), GREY)
        label = fmt_tick(v)
        draw_text(c, x0 - text_width(label, scale) - 2 * scale, to_y(v) - 2.5 * scale, label, scale=scale)
    for a, b, d, e in ((x0, y0, x1, y0), (x0, y1, x1, y1), (x0, y0, x0, y1), (x1, y0, x1, y1)):
        draw_line(c, a, b, d, e, BLACK)
    return to_y


def plot_aad(labels, aad, layers, path, uniform=None):
    """aad: list (one per checkpoint) of (depth, H) tensors; one dot per head, a line through the layer means,
    checkpoints side by side within each layer slot. Layers are 1-based. `uniform`: the distance of uniform
    attention, drawn as a dashed grey reference."""
    W, Hc, left, right, top, bottom = 600, 380, 70, 20, 60, 50
    c = torch.ones(3, Hc, W)
    ymax = nice_ceil(1.05 * max([float(a[[i - 1 for i in layers]].max()) for a in aad] + [uniform or 0.0]))
    box = (left, top, W - right, Hc - bottom)
    to_y = draw_axes(c, box, (0.0, ymax), [ymax * k / 4 for k in range(5)])
    if uniform is not None:
        for x in range(box[0], box[2] - 6, 12):
            draw_line(c, x, to_y(uniform), x + 6, to_y(uniform), PALETTE[-1])
        draw_text(c, box[2] - text_width('uniform') - 4, to_y(uniform) - 14, 'uniform', PALETTE[-1])
    slot = (box[2] - box[0]) / len(layers)
    K = len(aad)
    for j, layer in enumerate(layers):
        draw_text(c, box[0] + (j + 0.5) * slot - text_width(str(layer)) / 2, box[3] + 6, str(layer))
    for k, a in enumerate(aad):
        col, off = PALETTE[k % len(PALETTE)], (k - (K - 1) / 2) * min(10.0, slot / (K + 1))
        xs = [box[0] + (j + 0.5) * slot + off for j in range(len(layers))]
        means = [to_y(float(a[layer - 1].mean())) for layer in layers]
        for j in range(len(layers) - 1):
            draw_line(c, xs[j], means[j], xs[j + 1], means[j + 1], col, width=2)
        for j, layer in enumerate(layers):
            for v in a[layer - 1].tolist():
                draw_dot(c, xs[j], to_y(v), 3.0, col)
    draw_text(c, 10, 10, 'mean attention distance (px) per head')
    draw_legend(c, labels, 10, 32)
    draw_text(c, (box[0] + box[2]) / 2 - text_width('layer') / 2, Hc - 20, 'layer')
    torchvision.utils.save_image(c, path)


def plot_spectrum(labels, spectra, path, ncols=4):
    """spectra: list (one per checkpoint) of (depth, D) singular values; one panel per layer, log10 on y, rank
    index on x, one line per checkpoint."""
    depth = spectra[0].shape[0]
    pw, ph, panels = 260, 200, []
    for layer in range(depth):
        c = torch.ones(3, ph, pw)
        logs = [torch.log10(s[layer].clamp_min(float(s[layer].max()) * 1e-10 + 1e-30)) for s in spectra]
        lo = math.floor(min(float(v.min()) for v in logs))
        hi = max(lo + 1, math.ceil(max(float(v.max()) for v in logs)))
        box = (44, 26, pw - 10, ph - 24)
        to_y = draw_axes(c, box, (lo, hi), [lo, (lo + hi) / 2, hi])
        draw_text(c, box[0], 6, f'layer {layer + 1}')
        for k, v in enumerate(logs):
            xs = [box[0] + i / max(1, len(v) - 1) * (box[2] - box[0]) for i in range(len(v))]
            for i in range(len(v) - 1):
                draw_line(c, xs[i], to_y(float(v[i])), xs[i + 1], to_y(float(v[i + 1])), PALETTE[k % len(PALETTE)], 2)
        draw_text(c, box[0] - 2, box[3] + 6, '1')
        top_rank = str(max(len(v) for v in logs))
        draw_text(c, box[2] - text_width(top_rank), box[3] + 6, top_rank)
        panels.append(c)
    while len(panels) % ncols:
        panels.append(torch.ones(3, ph, pw))
    grid = torch.cat([torch.cat(panels[r:r + ncols], dim=2) for r in range(0, len(panels), ncols)], dim=1)
    header = torch.ones(3, 44, grid.shape[2])
    draw_text(header, 10, 6, 'log10 singular values of the feature covariance per layer (x: rank)')
    draw_legend(header, labels, 10, 24)
    torchvision.utils.save_image(torch.cat([header, grid], dim=1), path)


def heat_colors(a):
    """(..., h, w) values in [0, 1] -> (..., 3, h, w) blue-green-yellow-red colour map."""
    a = a.clamp(0, 1)[..., None, :, :]
    return torch.cat([1.5 - (4 * a - c).abs() for c in (3, 2, 1)], dim=-3).clamp(0, 1)  # r, g, b


def attention_overlay(imgs, att, grid, query=-1):
    """imgs (B, 3, S, S) in [0, 1], att (B, H, L) -> (B, 1 + H, 3, S, S): the image, then one map per head (each
    scaled to its own max, patch-sharp), blended on the image; a patch query is outlined in white."""
    B, H, L = att.shape
    S = imgs.shape[-1]
    a = att / att.amax(dim=-1, keepdim=True).clamp_min(1e-30)
    a = F.interpolate(a.reshape(B, H, grid, grid), size=(S, S), mode='nearest')  # (B, H, S, S)
    out = 0.35 * imgs[:, None] + 0.65 * heat_colors(a)  # (B, H, 3, S, S)
    out = torch.cat([imgs[:, None], out], dim=1)
    if query >= 0:
        p, (r, col) = S // grid, divmod(query, grid)
        for b in range(B):
            for h in range(1 + H):
                x0, y0, x1, y1 = col * p, r * p, (col + 1) * p, (r + 1) * p
                for edge in ((x0, y0, x1, y0 + 1), (x0, y1 - 1, x1, y1), (x0, y0, x0 + 1, y1), (x1 - 1, y0, x1, y1)):
                    fill_rect(out[b, h], *edge, torch.ones(3))
    return out

# -----------------------------------------------------------------------------
# tables


def markdown_table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    return '\n'.join(lines + ['| ' + ' | '.join(str(v) for v in r) + ' |' for r in rows])


def aad_tables(labels, aad, layers):
    """Side by side: per layer, mean over heads (min-max) for each checkpoint; then per head, per checkpoint."""
    rows = [[layer] + [f'{float(a[layer - 1].mean()):.1f} ({float(a[layer - 1].min()):.1f}-'
                       f'{float(a[layer - 1].max()):.1f})' for a in aad] for layer in layers]
    out = [markdown_table(['layer'] + [f'{lb} mean (min-max)' for lb in labels], rows)]
    for lb, a in zip(labels, aad):
        out.append(f'\n{lb}, per head (px):\n' + markdown_table(
            ['layer'] + [f'h{h}' for h in range(a.shape[1])], [[layer] + [f'{v:.1f}' for v in a[layer - 1].tolist()]
                                                               for layer in layers]))
    return out


def spectrum_table(labels, spectra):
    """Per layer and checkpoint: effective rank and log10 of the top singular value; then log10 sigma_k at k = 1, 2,
    4, ... for each checkpoint."""
    depth = spectra[0].shape[0]
    rows = [[layer + 1] + [f'{effective_rank(s[layer]):.1f} / {math.log10(max(float(s[layer, 0]), 1e-30)):.2f}'
                           for s in spectra] for layer in range(depth)]
    out = [markdown_table(['layer'] + [f'{lb} eff. rank / log10 s1' for lb in labels], rows)]
    for lb, s in zip(labels, spectra):
        ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if k <= s.shape[1]]
        out.append(f'\n{lb}, log10 singular value at rank k:\n' + markdown_table(
            ['layer'] + [f'k={k}' for k in ks],
            [[layer + 1] + [f'{math.log10(max(float(s[layer, k - 1]), 1e-30)):.2f}' for k in ks]
             for layer in range(depth)]))
    return out

# -----------------------------------------------------------------------------
# main


def safe_name(label):
    return ''.join(ch if ch.isalnum() or ch in '-_' else '_' for ch in label)


def main(argv=None):
    cfg = get_config(argv)
    what = cfg.what.split(',')
    device = cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    defaults = EMBEDDED if cfg.data in ('', 'shapes') else RECIPE

    # checkpoints and the one architecture / resolution they are all measured at
    ckpts = [read_checkpoint(path) for path in cfg.checkpoint]
    try:
        archs = [tuple(vit.checkpoint_arch(ck)[k] for k in ('model', 'patch_size', 'img_size')) if ck is not None
                 else None for ck in ckpts]
    except ValueError as e:
        sys.exit(f'error: {e}')
    first = next((a for a in archs if a is not None), None)
    fallback = first or (cfg.model or defaults['model'], cfg.patch_size or defaults['patch_size'], defaults['img_size'])
    img_size = cfg.img_size or fallback[2]
    labels, entries = [], []
    for path, ck, arch in zip(cfg.checkpoint, ckpts, archs):
        name = cfg.model or (arch or fallback)[0]
        p = cfg.patch_size or (arch or fallback)[1] or vit.SIZES[name][3]
        if img_size % p:
            sys.exit(f'error: image size {img_size} is not divisible by the patch size {p} of {path}')
        try:
            enc = build_encoder(ck, name, img_size, p, cfg.seed).to(device)
            rec = build_reconstructor(ck, img_size) if 'recon' in what else None
        except ValueError as e:
            sys.exit(f'error: {path}: {e}')
        labels.append(checkpoint_label(path, ck, labels))
        entries.append(SimpleNamespace(path=path, enc=enc, rec=rec.to(device) if rec is not None else None))
        print(f'{labels[-1]}: {path} -> ViT-{name} patch {p} at {img_size} px, {enc.num_heads} heads, depth {enc.depth}'
              + (', with decoder' if rec is not None else ''))
    layers = cfg.layer_list or list(range(1, min(e.enc.depth for e in entries) + 1))
    if any(not 1 <= layer <= e.enc.depth for layer in layers for e in entries):
        sys.exit(f'error: --layers {cfg.layers} is outside the depth of some checkpoint')
    if 'attn' in what and not all(0 <= cfg.attn_layer <= e.enc.depth for e in entries):
        sys.exit(f'error: --attn_layer {cfg.attn_layer} is outside 1..depth (0 = last) for some checkpoint')
    if 'attn' in what and not all(cfg.attn_query < e.enc.num_patches for e in entries):
        sys.exit(f'error: --attn_query {cfg.attn_query} is not a patch index (-1 = [CLS]; '
                 f'{min(e.enc.num_patches for e in entries)} patches at {img_size} px)')
    if 'recon' in what and not any(e.rec is not None for e in entries):
        sys.exit('error: --what recon needs a checkpoint with a pixel decoder (MAE or LUT pre-training checkpoint)')

    # images: evenly spaced over the split (covers all classes of a sorted ImageNet val), eval transform
    try:
        base = data.build_dataset(cfg.data, cfg.split, img_size)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'error: {e}')
    n = min(cfg.num_images, len(base))
    idx = np.unique(np.linspace(0, len(base) - 1, n).round().astype(int)).tolist()
    dataset = data.Seeded(torch.utils.data.Subset(base, idx), data.eval_transform(img_size))
    workers = defaults['num_workers'] if cfg.num_workers < 0 else cfg.num_workers
    loader, _ = data.make_loader(dataset, cfg.batch_size, num_workers=workers, train=False)

    # one pass over the images; every checkpoint sees every batch
    aad_sum = [torch.zeros(e.enc.depth, e.enc.num_heads, dtype=torch.float64) for e in entries]
    moments = [[None] * e.enc.depth for e in entries]
    dists = [patch_distances(e.enc.grid, e.enc.grid, e.enc.patch_size) for e in entries]
    vis, count = [], 0
    for imgs, _ in loader:
        imgs = imgs.to(device)
        if count < cfg.num_vis:
            vis.append(imgs[:cfg.num_vis - count])
        count += imgs.shape[0]
        for k, e in enumerate(entries):
            if 'aad' in what:
                maps = e.enc.forward_attention(imgs)  # list over layers of (B, H, 1+L, 1+L)
                for i, a in enumerate(maps):
                    aad_sum[k][i] += attention_distance(a, dists[k], cfg.cls_key).sum(dim=0).cpu()
                del maps
            if 'spectrum' in what:
                with torch.no_grad():
                    feats = e.enc.forward_intermediates(imgs, list(range(1, e.enc.depth + 1)))  # (B, 1+L, D) each
                for i, t in enumerate(feats):
                    t = t[:, 1:].mean(dim=1) if cfg.spectrum_tokens == 'mean' else t[:, 1:].flatten(0, 1)  # (N, D)
                    m = feature_moments(t)
                    moments[k][i] = m if moments[k][i] is None else tuple(x + y for x, y in zip(moments[k][i], m))
    vis = torch.cat(vis)
    print(f'{count} images from {cfg.data or "the embedded shapes"} ({cfg.split}) at {img_size} px')

    os.makedirs(cfg.out_dir, exist_ok=True)
    report = [f'# analyze.py: {", ".join(what)}\n', f'{count} images of {cfg.data or "the embedded shapes"} '
              f'({cfg.split}) at {img_size} px.\n', markdown_table(['label', 'checkpoint'], [[lb, e.path] for lb, e in
                                                                                            zip(labels, entries)])]
    results = {lb: {'checkpoint': e.path} for lb, e in zip(labels, entries)}
    written = []

    if 'aad' in what:
        aad = [s / count for s in aad_sum]  # (depth, H) per checkpoint
        uniform = float(dists[0].mean()) if len({d.shape for d in dists}) == 1 else None  # AAD of uniform attention
        title = f'px at {img_size} px; [CLS] key: {cfg.cls_key}'
        title += f'; uniform attention: {uniform:.1f}' if uniform else ''
        tables = aad_tables(labels, aad, layers)
        print(f'\naverage attention distance ({title})\n' + tables[0])
        report += [f'\n## Average attention distance ({title})\n'] + tables
        for lb, a in zip(labels, aad):
            results[lb]['aad'] = a.tolist()
        plot_aad(labels, aad, layers, os.path.join(cfg.out_dir, 'aad.png'), uniform)
        written.append(os.path.join(cfg.out_dir, 'aad.png'))

    if 'spectrum' in what:
        spectra = [torch.stack([covariance_spectrum(*m) for m in ms]).float() for ms in moments]  # (depth, D) each
        tables = spectrum_table(labels, spectra)
        print(f'\nfeature covariance spectrum ({cfg.spectrum_tokens} tokens)\n' + tables[0])
        report += [f'\n## Feature covariance spectrum ({cfg.spectrum_tokens} tokens, block outputs)\n'] + tables
        for lb, s in zip(labels, spectra):
            results[lb]['singular_values'] = s.tolist()
            results[lb]['effective_rank'] = [effective_rank(v) for v in s]
        if len({s.shape for s in spectra}) == 1:
            plot_spectrum(labels, spectra, os.path.join(cfg.out_dir, 'spectrum.png'))
            written.append(os.path.join(cfg.out_dir, 'spectrum.png'))
        else:
            print('note: checkpoints differ in width or depth; no overlaid spectrum plot')

    if 'attn' in what:
        for lb, e in zip(labels, entries):
            layer = cfg.attn_layer or e.enc.depth
            att = query_attention(e.enc.forward_attention(vis)[layer - 1], cfg.attn_query)  # (B, H, L)
            tiles = attention_overlay(data.denormalize(vis).cpu(), att.cpu(), e.enc.grid, cfg.attn_query)
            path = os.path.join(cfg.out_dir, f'attn_{safe_name(lb)}.png')
            torchvision.utils.save_image(tiles.flatten(0, 1), path, nrow=tiles.shape[1], padding=2, pad_value=1.0)
            written.append(path)

    if 'recon' in what:
        cols, masked_before, names = [data.denormalize(vis).cpu()], None, ['original']
        for lb, e in zip(labels, entries):
            if e.rec is None:
                print(f'note: {lb} has no pixel decoder; not in recon.png')
                continue
            noise = torch.rand(vis.shape[0], e.rec.num_patches, generator=torch.Generator().manual_seed(cfg.seed))
            masked, pasted = reconstruct(e.rec, vis, noise.to(device), cfg.mask_ratio or e.rec.mask_ratio)
            if masked_before is None or not torch.equal(masked, masked_before):  # same mask: show the input once
                cols.append(data.denormalize(masked).cpu())
                names.append(f'{lb} input')
            masked_before = masked
            cols.append(data.denormalize(pasted).cpu())
            names.append(lb)
        report.append('\nrecon.png columns: ' + ' | '.join(names))
        path = os.path.join(cfg.out_dir, 'recon.png')
        grid = torch.stack(cols, dim=1).flatten(0, 1)  # (B * columns, 3, S, S), one image per row
        torchvision.utils.save_image(grid, path, nrow=len(cols), padding=2, pad_value=1.0)
        written.append(path)

    with open(os.path.join(cfg.out_dir, 'report.md'), 'w') as f:
        f.write('\n'.join(report) + '\n\nfiles: ' + ', '.join(written) + '\n')
    with open(os.path.join(cfg.out_dir, 'results.json'), 'w') as f:
        json.dump({'config': {k: v for k, v in dataclasses.asdict(cfg).items()}, 'img_size': img_size,
                   'num_images': count, 'results': results}, f)
    print('\nwrote ' + ', '.join(written + [os.path.join(cfg.out_dir, n) for n in ('report.md', 'results.json')]))


if __name__ == '__main__':
    main()
