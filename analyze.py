"""
analyze.py -- the measurements and pictures used to compare MIM encoders, for one or several checkpoints.

  aad       average attention distance per layer and head (ViT paper fig. 7; LUT's attention-span figure):
            for every patch query, the attention-weighted mean pixel distance to the patch keys, averaged over
            queries and images. Table per layer, PNG with one dot per head (layer on x, pixels on y).
  attn      attention maps of one layer (default the last) for the [CLS] query, or for one patch query, per head,
            overlaid on the images in grey (PNG grid, one file per checkpoint).
  spectrum  per-layer singular values s_1 >= s_2 >= ... of the feature covariance (LUT; Jing et al. 2022).
            Effective rank = exp(-sum_k p_k ln p_k) with p_k = s_k / sum_j s_j (Roy & Vetterli 2007): D for a
            flat spectrum, 1 for a single direction. Table of effective rank and log10 values; PNG with one panel
            per layer of p_k (the normalised values the effective rank is computed from) on a log axis.
  recon     MAE / LUT reconstructions of masked images, for checkpoints that hold a decoder (PNG grid).
  curves    training curves of one or several runs (--log, no checkpoint): each logged training statistic (the
            method's loss terms, grad norm) and the kNN monitor's top-1 against the epoch, one line per run, in
            curves.png, and the kNN top-1 per epoch as a table in report.md.

  python analyze.py --checkpoint none --checkpoint out/mae/checkpoint.pt --what all   # embedded data, CPU
  python analyze.py --data /path/to/imagenet --what aad --layers 10,11,12 \\
      --checkpoint out/mae/checkpoint.pt --checkpoint out/lut/checkpoint.pt          # LUT's AAD figure, IN-1K val
  python analyze.py --what curves --log out/mae --log out/lut/log.jsonl                  # training curves
  python analyze.py --help                                                            # every knob

--checkpoint is repeatable; 'none' is a randomly initialised ViT of the same shape as the first real checkpoint.
Every checkpoint is measured on the same images at the same resolution, so tables are side by side and plots
are overlaid. Outputs go to --out_dir: report.md (every table), results.json, aad.png, spectrum.png,
attn_<label>.png, recon.png. The PNGs are drawn by matplotlib, an optional dependency of this script only
(`pip install matplotlib`); without it the tables and results.json are still written, and one line says so.

Letters in shape comments: B batch, H heads, L patches, D width, P pixels per patch (p*p*3), S image side.
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import sys
import textwrap
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

import data
import vit

WHAT = ('aad', 'attn', 'spectrum', 'recon')

# -----------------------------------------------------------------------------
# config: typed defaults, one comment each (the comment is the flag's --help); 0 / '' = by checkpoint, then --data


@dataclass
class Config:
    what: str = 'aad'          # comma list of aad|attn|spectrum|recon, or 'all'; or curves (with --log)
    log: list = field(default_factory=list)  # repeatable, --what curves: a run's log.jsonl or its out_dir
    checkpoint: list = field(default_factory=list)  # repeatable: a path, or 'none' (random init); default: none
    trust_checkpoint: bool = False  # load a file that is more than data (its unpickling can run code); only if trusted
    data: str = ''             # '' = embedded shapes; fashion-mnist | mnist | idx:DIR; or an image folder
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
    num_workers: int = -1      # loader workers, capped at the CPUs this process may use
    device: str = ''           # cuda|cpu|cuda:N; '' = cuda if available


# what 0 / '' / -1 resolve to when no checkpoint says: by the regime of --data (the small idx datasets: ViT-mini at
# 32 px, as the README's Results protocol)
REGIMES = {
    'embedded': dict(model='tiny', img_size=64, patch_size=8, num_workers=0),
    'small': dict(model='mini', img_size=32, patch_size=4, num_workers=2),
    'folder': dict(model='base', img_size=224, patch_size=0, num_workers=8),
}


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
    """argparse from the dataclass (unknown flags rejected); data-dependent defaults are filled in main()
    because they depend on the checkpoints."""
    helps = field_help(Config)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.name == 'checkpoint':
            p.add_argument('--checkpoint', action='append', default=None, metavar='PATH|none',
                           help=helps.get('checkpoint', '').replace('%', '%%'))
        elif f.name == 'log':
            p.add_argument('--log', action='append', default=[], metavar='PATH', help=helps.get('log', ''))
        else:
            picked = '; '.join(f'{r} {v[f.name]!r}' for r, v in REGIMES.items() if f.name in v)
            default = f'default {f.default!r}' + (f' = picked by --data: {picked}' if picked else '')
            kind = dict(type=lambda s: s.lower() in ('1', 'true', 'yes', 'on'), nargs='?', const=True,
                        metavar='BOOL') if f.type is bool else dict(type=f.type)
            p.add_argument(f'--{f.name}', default=f.default,
                           help=f'{helps.get(f.name, "")} ({default})'.replace('%', '%%'), **kind)
    cfg = Config(**vars(p.parse_args(argv)))
    cfg.checkpoint = cfg.checkpoint or ['none']
    cfg.what = ','.join(WHAT) if cfg.what == 'all' else cfg.what
    bad = [w for w in cfg.what.split(',') if w not in WHAT] if cfg.what != 'curves' else []
    if bad:
        p.error(f'--what {",".join(bad)}: choose from {", ".join(WHAT)} or all, or curves')
    if (cfg.what == 'curves') != bool(cfg.log):
        p.error('--what curves takes the runs as --log PATH (a log.jsonl or its out_dir); --log needs --what curves')
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

# -----------------------------------------------------------------------------
# checkpoints: architecture, encoder, decoder


def read_checkpoint(path, trust=False):
    """'none' -> None; a path -> the loaded dict. One error line when it is missing or unreadable."""
    if path == 'none':
        return None
    if not os.path.exists(path):
        sys.exit(f'error: checkpoint {path} does not exist')
    try:
        ckpt = vit.read_checkpoint(path, trust=trust)
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
    """imgs (B, 3, S, S) normalised, noise (B, L) -> (masked input, reconstruction with the visible patches pasted,
    the same un-normalised with statistics the model could know), each (B, 3, S, S) normalised. Under norm_pix the
    model predicts normalised patches: the second output un-normalises each with the true patch's mean and std (the
    usual way to look at norm-pix models; it leaks the masked patches' first two moments, so the target shows
    through), the third with the mean and std of the image's visible patches (mae.unnormalize_prediction). Without
    norm_pix the prediction is in pixels and the two are equal."""
    import mae
    _, pred, mask = model(imgs, noise, mask_ratio, model.norm_pix)  # pred (B, L, P), mask (B, L) 1 = removed
    p = model.patch_size
    target = vit.patchify(imgs, p)  # (B, L, P)
    true_stats, vis_stats = mae.unnormalize_prediction(pred.float(), target, mask) if model.norm_pix \
        else (pred.float(), pred.float())
    m = mask[..., None]  # (B, L, 1)
    return (vit.unpatchify(target * (1 - m), p), vit.unpatchify(target * (1 - m) + true_stats * m, p),
            vit.unpatchify(target * (1 - m) + vis_stats * m, p))

# -----------------------------------------------------------------------------
# figures: matplotlib, an optional dependency of this script only (the tables and results.json need none)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display), or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path):
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def plot_aad(labels, aad, layers, path, title, uniform=None):
    """aad: list (one per checkpoint) of (depth, H) tensors. One dot per head and a line through the mean over heads,
    layer (1-based block) on x, pixels on y, checkpoints side by side within each layer. `uniform`: the distance
    of uniform attention, a dashed reference line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(8.0, 0.6 * len(layers) + 4.0), 4.5), layout='constrained')
    K, xs = len(aad), np.arange(len(layers))
    width = 0.6 / K  # the checkpoints of one layer share 0.6 of the slot
    for k, (label, a) in enumerate(zip(labels, aad)):
        x = xs + (k - (K - 1) / 2) * width
        v = a[[layer - 1 for layer in layers]].numpy()  # (layers, H)
        ax.scatter(np.repeat(x, v.shape[1]), v.reshape(-1), s=14, color=f'C{k}', alpha=0.5, linewidths=0)
        ax.plot(x, v.mean(axis=1), '-o', color=f'C{k}', ms=4, lw=1.5, label=f'{label}: mean over heads')
    ax.scatter([], [], s=14, color='grey', alpha=0.5, linewidths=0, label='one dot per head')
    if uniform is not None:
        ax.axhline(uniform, ls='--', lw=1, color='grey', label=f'uniform attention ({uniform:.1f} px)')
    ax.set_xticks(xs, [str(layer) for layer in layers])
    ax.set_xlabel('layer (transformer block)')
    ax.set_ylabel('average attention distance (px)')
    ax.set_ylim(0, 1.1 * max([float(a[[layer - 1 for layer in layers]].max()) for a in aad] + [uniform or 0.0]))
    ax.grid(axis='y', alpha=0.3)
    ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def plot_spectrum(labels, spectra, path, title, ncols=4):
    """spectra: list (one per checkpoint) of (depth, D) singular values, same shape. One panel per layer: rank k on x,
    p_k = s_k / sum_j s_j (what effective_rank measures) on a log y axis, one line per checkpoint, each with its
    effective rank written in the panel. Normalised, a spectrum that is flatter (higher effective rank) lies higher in
    its tail whatever the features' overall scale."""
    plt = pyplot()
    depth, D = spectra[0].shape
    ncols = min(ncols, depth)
    nrows = math.ceil(depth / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.4 * nrows + 1.3), layout='constrained',
                             squeeze=False)
    ranks = np.arange(1, D + 1)
    for i, ax in enumerate(axes.flat):
        if i >= depth:
            ax.axis('off')
            continue
        for k, s in enumerate(spectra):
            v = s[i].double().clamp_min(0)
            p = (v / v.sum().clamp_min(1e-30)).numpy()  # (D,) sums to 1
            p[p < 1e-10] = np.nan  # numerically zero (fewer samples than D): no logarithm, not drawn
            ax.plot(ranks, p, color=f'C{k}', lw=1.5, label=labels[k])
            ax.text(0.97, 0.95 - 0.12 * k, f'eff. rank {effective_rank(s[i]):.1f}', color=f'C{k}', fontsize=8,
                    ha='right', va='top', transform=ax.transAxes)
        ax.set_yscale('log')
        ax.set_title(f'block {i + 1}', fontsize=10)
        ax.grid(alpha=0.3)
        if i % ncols == 0:
            ax.set_ylabel(r'$p_k = s_k\ /\ \sum_j s_j$')
        if i + ncols >= depth:  # lowest panel of its column
            ax.set_xlabel('rank k')
    fig.suptitle(title, fontsize=11)
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc='outside lower center', ncols=len(labels),
               frameon=False)
    save_figure(fig, path)


def plot_attention(imgs, att, grid, path, title, query=-1):
    """imgs (B, 3, S, S) in [0, 1], att (B, H, L) -> one row per image: the image, then each head's map over the
    image in grey (scaled to the head's own max, one square per patch). A patch query is outlined in cyan."""
    plt = pyplot()
    from matplotlib.patches import Rectangle
    B, H, L = att.shape
    S = imgs.shape[-1]
    a = (att / att.amax(dim=-1, keepdim=True).clamp_min(1e-30)).reshape(B, H, grid, grid).numpy()
    fig, axes = plt.subplots(B, 1 + H, figsize=(1.3 * (1 + H) + 1.0, 1.3 * B + 1.0), layout='constrained',
                             squeeze=False)
    extent, p = (-0.5, S - 0.5, S - 0.5, -0.5), S / grid
    for b in range(B):
        img = imgs[b].permute(1, 2, 0).clamp(0, 1).numpy()  # (S, S, 3)
        for h in range(1 + H):
            ax = axes[b, h]
            if h == 0:
                ax.imshow(img, interpolation='nearest')
            else:  # grey underneath: the colours on the map are the attention's only
                ax.imshow(img.mean(axis=-1), cmap='gray', vmin=0, vmax=1, interpolation='nearest')
                im = ax.imshow(a[b, h - 1], cmap='inferno', alpha=0.65, vmin=0, vmax=1, interpolation='nearest',
                               extent=extent)
            if query >= 0:
                r, c = divmod(query, grid)
                ax.add_patch(Rectangle((c * p - 0.5, r * p - 0.5), p, p, fill=False, edgecolor='cyan', lw=1.5))
            ax.set_xticks([])
            ax.set_yticks([])
            if b == 0:
                ax.set_title('image' if h == 0 else f'head {h}', fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.6, fraction=0.25 / (1 + H), pad=0.01, label='attention / max of the head')
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def plot_images(cols, names, path, title):
    """cols: list of (B, 3, S, S) in [0, 1], one column each, headed by `names`; one row per image."""
    plt = pyplot()
    B, K = cols[0].shape[0], len(cols)
    fig, axes = plt.subplots(B, K, figsize=(max(5.0, 1.6 * K + 0.4), 1.4 * B + 1.1), layout='constrained',
                             squeeze=False)
    for b in range(B):
        for j in range(K):
            axes[b, j].imshow(cols[j][b].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation='nearest')
            axes[b, j].set_xticks([])
            axes[b, j].set_yticks([])
            if b == 0:
                axes[b, j].set_title(names[j], fontsize=9)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)

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


# -----------------------------------------------------------------------------
# curves: the log.jsonl of training runs (no checkpoint, no images)

BOOKKEEPING = ('step', 'end_step', 'epoch', 'img_per_s', 'eta_min', 'knn_seconds')


def read_log(path):
    """A run's log.jsonl (or its out_dir) -> (label, loss records, kNN records, statistic names). Records are sorted
    by step; a step logged twice (a resumed run redoes the steps after its checkpoint) keeps the later record. The
    statistics are the keys after eta_min in a loss record (the method's STATS, as log_stats writes them); the label
    is the method (from checkpoint.pt beside the log, read as weights only) and the run's folder."""
    file = os.path.join(path, 'log.jsonl') if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f'--log {path}: no log.jsonl there')
    by_step, stats, skipped = ({}, {}), [], 0
    with open(file) as f:
        for line in f:
            try:
                rec = json.loads(line)
                kind = 'knn_top1' in rec
                by_step[kind][int(rec['step'])] = rec
            except (ValueError, KeyError, TypeError):
                skipped += 1  # a torn last line of a killed run, or not a record
                continue
            if not kind and 'eta_min' in rec:
                keys = list(rec)
                stats += [k for k in keys[keys.index('eta_min') + 1:] if k not in stats]
    if skipped:
        print(f'note: {file}: {skipped} line(s) that are not log records skipped')
    run = os.path.basename(os.path.dirname(os.path.abspath(file)))
    method = None
    try:
        method = torch.load(os.path.join(os.path.dirname(file), 'checkpoint.pt'), map_location='cpu',
                            weights_only=True, mmap=True).get('method')
    except Exception:  # no checkpoint (yet), or another kind of file: the folder name alone
        pass
    label = run if method in (None, run) else f'{method} ({run})'
    return label, [by_step[0][k] for k in sorted(by_step[0])], [by_step[1][k] for k in sorted(by_step[1])], stats


def curves_table(labels, knn):
    """kNN top-1 per run (rows) and epoch (columns: every epoch any run has a point at)."""
    epochs = sorted({round(r['epoch'], 4) for recs in knn for r in recs})
    rows = []
    for lb, recs in zip(labels, knn):
        at = {round(r['epoch'], 4): r['knn_top1'] for r in recs}
        secs = [r['knn_seconds'] for r in recs if 'knn_seconds' in r]
        rows.append([lb] + [f'{at[e]:.2f}' if e in at else '-' for e in epochs]
                    + [f'{sum(secs) / len(secs):.1f}' if secs else '-'])
    return markdown_table(['run'] + [f'ep {e:g}' for e in epochs] + ['s / pass'], rows)


def plot_curves(labels, losses, knn, stats, path, title):
    plt = pyplot()
    panels = (['knn_top1'] if any(knn) else []) + stats
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.4 * nrows + 0.8), squeeze=False)
    for ax, key in zip(axes.flat, panels):
        for i, (lb, recs) in enumerate(zip(labels, losses)):
            recs = knn[i] if key == 'knn_top1' else [r for r in recs if key in r]
            if recs:
                ax.plot([r['epoch'] for r in recs], [r[key] for r in recs], marker='o' if len(recs) < 30 else None,
                        ms=3, label=lb, color=f'C{i % 10}')
        ax.set_title(key + (' (%)' if key == 'knn_top1' else ''), fontsize=10)
        ax.set_xlabel('epoch', fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis('off')
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def run_curves(cfg):
    """--what curves: read every --log, write curves.png (matplotlib) and report.md (the kNN table) to out_dir."""
    try:
        runs = [read_log(p) for p in cfg.log]
    except ValueError as e:
        sys.exit(f'error: {e}')
    labels = [lb if [r[0] for r in runs].count(lb) == 1 else f'{lb} #{i + 1}' for i, (lb, *_) in enumerate(runs)]
    losses, knn = [r[1] for r in runs], [r[2] for r in runs]
    stats = [k for r in runs for k in r[3]]
    stats = [k for i, k in enumerate(stats) if k not in stats[:i] and k not in BOOKKEEPING]
    os.makedirs(cfg.out_dir, exist_ok=True)
    table = curves_table(labels, knn)
    rows = []
    for lb, recs in zip(labels, losses):
        end = recs[-1] if recs else {'step': 0, 'epoch': 0.0}
        rows.append([lb, end['step'], f"{end['epoch']:.2f}"] + [f'{end[k]:.4g}' if k in end else '-' for k in stats])
    last = markdown_table(['run', 'steps', 'epochs'] + stats, rows)
    print('kNN top-1 (%) per epoch\n' + table + '\n\nlast logged statistics\n' + last)
    report = ['# analyze.py: curves\n', markdown_table(['run', 'log'], [[lb, p] for lb, p in zip(labels, cfg.log)]),
              '\n## kNN top-1 (%) per epoch (the monitor: k 20, T 0.07, fixed subset; ep 0 = random init)\n', table,
              '\n## Last logged statistics\n', last]
    written, plt = [], pyplot()
    if plt and (any(knn) or stats):
        path = os.path.join(cfg.out_dir, 'curves.png')
        plot_curves(labels, losses, knn, stats, path, title='training curves: ' + textwrap.fill(', '.join(labels), 90))
        written.append(path)
    with open(os.path.join(cfg.out_dir, 'report.md'), 'w') as f:
        files = (', '.join(written) or 'none') if plt else 'no PNGs (matplotlib is not installed)'
        f.write('\n'.join(report) + f'\n\nfiles: {files}\n')
    print('\nwrote ' + ', '.join(written + [os.path.join(cfg.out_dir, 'report.md')]))
    if plt is None:
        print('no PNGs: matplotlib is not installed; `pip install matplotlib` and rerun to get them')


def load_encoders(cfg, what, device):
    """The checkpoints and the one architecture / resolution they are all measured at; without --data, the images the
    first nanoMIM checkpoint was pre-trained on when they are the embedded or a small set (a line says which).
    Returns (img_size, labels, entries: one (path, enc, rec) each, layers of the AAD table)."""
    ckpts = [read_checkpoint(path, cfg.trust_checkpoint) for path in cfg.checkpoint]
    trained = next((ck['config'].get('data') for ck in ckpts if isinstance(ck, dict) and 'encoder' in ck
                    and isinstance(ck.get('config'), dict)), None)
    cfg.data, note = data.data_from_checkpoint(cfg.data, trained)
    if note:
        print(note)
    defaults = REGIMES[data.regime(cfg.data)]
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
            sys.exit(f'error: {path}: {vit.as_flags(e)}')
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
    return img_size, labels, entries, layers


def image_loader(cfg, img_size):
    """--num_images images evenly spaced over the split (covers all classes of a sorted ImageNet val), eval
    transform, in order."""
    try:
        base = data.build_dataset(cfg.data, cfg.split, img_size)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'error: {e}')
    n = min(cfg.num_images, len(base))
    idx = np.unique(np.linspace(0, len(base) - 1, n).round().astype(int)).tolist()
    dataset = data.Seeded(torch.utils.data.Subset(base, idx), data.eval_transform(img_size))
    defaults = REGIMES[data.regime(cfg.data)]
    workers = data.default_workers(defaults['num_workers'] if cfg.num_workers < 0 else cfg.num_workers)
    loader, _ = data.make_loader(dataset, cfg.batch_size, num_workers=workers, train=False)
    return loader


def measure(cfg, what, entries, loader, device):
    """One pass over the images; every checkpoint sees every batch. Returns the attention distances summed over
    images (depth, H) and the feature moments per block, for each checkpoint; the first --num_vis images; the count."""
    aad_sum = [torch.zeros(e.enc.depth, e.enc.num_heads, dtype=torch.float64) for e in entries]
    moments = [[None] * e.enc.depth for e in entries]
    dists = [patch_distances(e.enc.grid, e.enc.grid, e.enc.patch_size) for e in entries]
    vis, count = [], 0
    prog = data.Progress(f'analyze, {len(entries)} checkpoint(s)', total=len(loader.dataset), unit='img')
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
        prog.update(imgs.shape[0])
    prog.close()
    return SimpleNamespace(aad_sum=aad_sum, moments=moments, dists=dists, vis=torch.cat(vis), count=count)


def aad_section(cfg, out, m, layers):
    """Average attention distance: table (printed and in report.md), results, aad.png."""
    aad = [s / m.count for s in m.aad_sum]  # (depth, H) per checkpoint
    uniform = float(m.dists[0].mean()) if len({d.shape for d in m.dists}) == 1 else None  # AAD of uniform attention
    title = f'px at {out.img_size} px; [CLS] key: {cfg.cls_key}'
    title += f'; uniform attention: {uniform:.1f}' if uniform else ''
    tables = aad_tables(out.labels, aad, layers)
    print(f'\naverage attention distance ({title})\n' + tables[0])
    out.report += [f'\n## Average attention distance ({title})\n'] + tables
    for lb, a in zip(out.labels, aad):
        out.results[lb]['aad'] = a.tolist()
    if out.plt:
        plot_aad(out.labels, aad, layers, os.path.join(cfg.out_dir, 'aad.png'), uniform=uniform,
                 title=f'Average attention distance per layer and head\n{out.names}\n{out.source}, [CLS] key: '
                       f'{cfg.cls_key}')
        out.written.append(os.path.join(cfg.out_dir, 'aad.png'))


def spectrum_section(cfg, out, m):
    """Feature covariance spectrum: table (printed and in report.md), results, spectrum.png."""
    spectra = [torch.stack([covariance_spectrum(*mo) for mo in ms]).float() for ms in m.moments]  # (depth, D) each
    tables = spectrum_table(out.labels, spectra)
    print(f'\nfeature covariance spectrum ({cfg.spectrum_tokens} tokens)\n' + tables[0])
    out.report += [f'\n## Feature covariance spectrum ({cfg.spectrum_tokens} tokens, block outputs)\n'] + tables
    for lb, s in zip(out.labels, spectra):
        out.results[lb]['singular_values'] = s.tolist()
        out.results[lb]['effective_rank'] = [effective_rank(v) for v in s]
    if out.plt and len({s.shape for s in spectra}) == 1:
        plot_spectrum(out.labels, spectra, os.path.join(cfg.out_dir, 'spectrum.png'),
                      title=r'Normalised singular values $p_k = s_k / \sum_j s_j$ of the feature covariance '
                            f'({cfg.spectrum_tokens} tokens) per block;\n'
                            r'effective rank $= \exp(-\sum_k p_k \ln p_k)$ (D if flat, 1 for one direction)'
                            f'\n{out.names}\n{out.source}')
        out.written.append(os.path.join(cfg.out_dir, 'spectrum.png'))
    elif out.plt:
        print('note: checkpoints differ in width or depth; no overlaid spectrum plot')


def attn_figures(cfg, out, vis):
    """attn_<label>.png per checkpoint: one block's attention of the [CLS] or a patch query, per head."""
    query = '[CLS] query' if cfg.attn_query < 0 else f'query patch {cfg.attn_query} (outlined)'
    for lb, e in zip(out.labels, out.entries):
        layer = cfg.attn_layer or e.enc.depth
        att = query_attention(e.enc.forward_attention(vis)[layer - 1], cfg.attn_query)  # (B, H, L)
        path = os.path.join(cfg.out_dir, f'attn_{safe_name(lb)}.png')
        plot_attention(data.denormalize(vis).cpu(), att.cpu(), e.enc.grid, path, query=cfg.attn_query,
                       title=f'{lb}: attention of the {query}, block {layer} of {e.enc.depth}\n'
                             + (e.path if e.path != 'none' else f'random init, seed {cfg.seed}'))
        out.written.append(path)


def recon_figure(cfg, out, vis, device):
    """recon.png: the images, each decoder checkpoint's masked input and its reconstruction, one column each."""
    cols, masked_before, cols_names, recon_labels = [data.denormalize(vis).cpu()], None, ['original'], []
    norm_pix = False  # any norm-pix checkpoint: the title says how its predictions are un-normalised
    for lb, e in zip(out.labels, out.entries):
        if e.rec is None:
            print(f'note: {lb} has no pixel decoder; not in recon.png')
            continue
        noise = torch.rand(vis.shape[0], e.rec.num_patches, generator=torch.Generator().manual_seed(cfg.seed))
        ratio = cfg.mask_ratio or e.rec.mask_ratio
        masked, pasted, pasted_vis = reconstruct(e.rec, vis, noise.to(device), ratio)
        if masked_before is None or not torch.equal(masked, masked_before):  # same mask: show the input once
            cols.append(data.denormalize(masked).cpu())
            cols_names.append(f'{lb} input\n({ratio:.0%} masked)')
        masked_before = masked
        if e.rec.norm_pix:  # both un-normalisations side by side
            cols += [data.denormalize(pasted).cpu(), data.denormalize(pasted_vis).cpu()]
            cols_names += [f'{lb}\ntrue stats', f'{lb}\nvisible stats']
            norm_pix = True
        else:
            cols.append(data.denormalize(pasted).cpu())
            cols_names.append(lb)
        recon_labels.append(lb)
    out.report.append('\nrecon.png columns: ' + ' | '.join(n.replace('\n', ' ') for n in cols_names))
    path = os.path.join(cfg.out_dir, 'recon.png')
    stats = ('\nnorm-pix: "true stats" un-normalises each predicted patch with the real patch\'s mean and std, '
             'which the model\nis not given (the target shows through); "visible stats" with the mean and std of '
             'the image\'s\nvisible patches, which the model could know') if norm_pix else ''
    plot_images(cols, cols_names, path, title=f'Reconstructions: {textwrap.fill(", ".join(recon_labels), 60)}\n'
                                              f'masked patches predicted, visible ones pasted\n{out.source}{stats}')
    out.written.append(path)


def main(argv=None):
    cfg = get_config(argv)
    if cfg.what == 'curves':
        return run_curves(cfg)
    what = cfg.what.split(',')
    device = resolve_device(cfg.device, 0, False, torch.cuda.is_available())
    img_size, labels, entries, layers = load_encoders(cfg, what, device)
    m = measure(cfg, what, entries, image_loader(cfg, img_size), device)
    source = f'{m.count} images of {cfg.data or "the embedded shapes"} ({cfg.split}) at {img_size} px'
    print(source)

    # every table goes to report.md and results.json, every figure to a PNG (plt None: no matplotlib, no PNGs)
    os.makedirs(cfg.out_dir, exist_ok=True)
    report = [f'# analyze.py: {", ".join(what)}\n', f'{source}.\n',
              markdown_table(['label', 'checkpoint'], [[lb, e.path] for lb, e in zip(labels, entries)])]
    out = SimpleNamespace(labels=labels, entries=entries, img_size=img_size, source=source, report=report,
                          results={lb: {'checkpoint': e.path} for lb, e in zip(labels, entries)}, written=[],
                          plt=pyplot(), names=textwrap.fill(', '.join(labels), 90))  # names: in figure titles
    if 'aad' in what:
        aad_section(cfg, out, m, layers)
    if 'spectrum' in what:
        spectrum_section(cfg, out, m)
    if 'attn' in what and out.plt:
        attn_figures(cfg, out, m.vis)
    if 'recon' in what and out.plt:
        recon_figure(cfg, out, m.vis, device)

    with open(os.path.join(cfg.out_dir, 'report.md'), 'w') as f:
        files = (', '.join(out.written) or 'none') if out.plt else 'no PNGs (matplotlib is not installed)'
        f.write('\n'.join(out.report) + f'\n\nfiles: {files}\n')
    with open(os.path.join(cfg.out_dir, 'results.json'), 'w') as f:
        json.dump({'config': {k: v for k, v in dataclasses.asdict(cfg).items()}, 'img_size': img_size,
                   'num_images': m.count, 'results': out.results}, f)
    print('\nwrote ' + ', '.join(out.written + [os.path.join(cfg.out_dir, n) for n in ('report.md', 'results.json')]))
    if out.plt is None:
        print('no PNGs: matplotlib is not installed; `pip install matplotlib` and rerun to get them')


if __name__ == '__main__':
    main()
