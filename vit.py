"""
vit.py -- the one Vision Transformer every nanoMIM script uses.

Parameter names follow the common ViT layout (timm `vision_transformer`, MAE, iBOT, DINO):
  cls_token, pos_embed, patch_embed.proj,
  blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2,ls1.gamma,ls2.gamma},
  norm, fc_norm, head
so `backbone_state_dict(model)` loads into timm's ViT of the same size with no renaming, and the official
MAE / iBOT / LUT / DTM / BEiT-style backbones load here: `load_vit(path)` builds the ViT a checkpoint holds (width,
depth, heads, patch, MLP ratio, qkv bias, layer scale read off its tensors) and loads it, for every script.

Letters used in shape comments: B batch, L patches, K kept patches, D width, H heads, P pixels per patch (p*p*3).

Forward paths (small methods, one per use):
  forward_features(x, mask=None)  all tokens (B, 1+L, D) after the final norm; `mask` (B, L) bool puts the
                                  mask token at masked positions inside the encoder (iBOT / DTM)
  forward_kept(x, ids_keep)       only the kept patches and [CLS] (B, 1+K, D) (MAE / LUT encoder)
  forward_intermediates(x, idx)   raw outputs of the listed blocks (segmentation, analysis)
  forward_attention(x)            per-layer attention maps (B, H, 1+L, 1+L), explicit softmax (analysis only)
  forward(x)                      pooled features -> head (fine-tuning / probing)
"""
import argparse
import math
import os
import pickle
import re
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# name: (width D, depth, heads, patch size)
SIZES = {
    'mini': (128, 6, 4, 16),   # not a published size: a 1.2M-parameter ViT for CPU-scale protocols (README "Results")
    'tiny': (192, 12, 3, 16),
    'small': (384, 12, 6, 16),
    'base': (768, 12, 12, 16),
    'large': (1024, 24, 16, 16),
    'huge': (1280, 32, 16, 14),
}

# -----------------------------------------------------------------------------
# patches and position embeddings


def patchify(imgs, p):
    """(B, 3, H, W) -> (B, L, p*p*3), pixel order (p, q, c) inside a patch, patches row-major (MAE layout)."""
    B, C, H, W = imgs.shape
    assert H % p == 0 and W % p == 0, f'image {H}x{W} is not divisible by patch size {p}'
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = torch.einsum('nchpwq->nhwpqc', x)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x, p, h=None, w=None, channels=3):
    """(B, L, p*p*C) -> (B, C, h*p, w*p); the exact inverse of patchify (square grid unless h, w given)."""
    B, L, _ = x.shape
    if h is None:
        h = w = int(round(math.sqrt(L)))
    assert h * w == L, f'{L} patches do not form a {h}x{w} grid'
    x = x.reshape(B, h, w, p, p, channels)
    x = torch.einsum('nhwpqc->nchpwq', x)
    return x.reshape(B, channels, h * p, w * p)


def sincos_1d(dim, pos):
    """1-D sin-cos embedding: pos (M,) -> (M, dim), all sines then all cosines (MAE util/pos_embed.py)."""
    assert dim % 2 == 0
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))  # (dim/2,)
    out = np.einsum('m,d->md', pos.reshape(-1).astype(np.float64), omega)  # (M, dim/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed(dim, grid_h, grid_w=None, cls_token=True):
    """Fixed 2-D sin-cos position embedding -> tensor (1 + h*w, dim) with a zero [CLS] row (or (h*w, dim)).
    As in MAE: the first dim/2 channels encode the column index, the last dim/2 the row index."""
    grid_w = grid_h if grid_w is None else grid_w
    assert dim % 4 == 0, 'sin-cos position embedding needs a width divisible by 4'
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing='ij')  # (h, w) each, row-major
    emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)  # (h*w, dim)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float()


def interpolate_pos_embed(pos_embed, grid_hw, num_extra=1, dino_scale=False):
    """Resize the patch part of a position embedding (1, num_extra + g*g, D) to grid (h, w), bicubic; extra
    token rows ([CLS]) are kept. Returns the input unchanged when the grid already matches.
    dino_scale: the DINO / iBOT form (their vision_transformer.interpolate_pos_encoding),
    interpolate(scale_factor=((h + 0.1) / g, (w + 0.1) / g)): the same output grid, but the source positions
    follow that scale factor rather than the size ratio g / h, so the values differ (iBOT's local crops)."""
    n = pos_embed.shape[1] - num_extra
    g = int(round(math.sqrt(n)))
    assert g * g == n, f'position embedding with {n} patch rows is not a square grid'
    h, w = grid_hw
    if (h, w) == (g, g):
        return pos_embed
    extra, grid = pos_embed[:, :num_extra], pos_embed[:, num_extra:]
    D = grid.shape[-1]
    grid = grid.reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    if dino_scale:  # +0.1 avoids the floor of g * (h / g) landing one short (DINO issue 8)
        grid = F.interpolate(grid.float(), scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode='bicubic')
        assert grid.shape[-2:] == (h, w)
    else:
        grid = F.interpolate(grid.float(), size=(h, w), mode='bicubic', align_corners=False)
    grid = grid.to(pos_embed.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, D)
    return torch.cat([extra, grid], dim=1)


# -----------------------------------------------------------------------------
# blocks


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch per sample with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    return x * keep / (1 - p)


class LayerScale(nn.Module):
    def __init__(self, dim, init_value):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        assert dim % num_heads == 0, f'width {dim} is not divisible by {num_heads} heads'
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, return_attn=False):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, D/H) each
        if return_attn:  # explicit softmax, only for analysis: the training path never takes it
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, N, N)
            if attn_mask is not None:
                boolean = attn_mask.dtype == torch.bool
                attn = attn.masked_fill(~attn_mask, float('-inf')) if boolean else attn + attn_mask
            attn = attn.softmax(dim=-1)
            out = attn @ v
        else:
            out, attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask), None  # flash / mem-efficient
        out = self.proj(out.transpose(1, 2).reshape(B, N, D))
        return out, attn


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(LS(Attn(LN(x)))), x + DropPath(LS(MLP(LN(x))))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, layer_scale=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x, attn_mask=None, return_attn=False):
        a, attn = self.attn(self.norm1(x), attn_mask, return_attn)
        x = x + drop_path(self.ls1(a), self.drop_path, self.training)
        x = x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)
        return (x, attn) if return_attn else x


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        """(B, C, H, W) -> (B, L, D), tokens in row-major (h, w) order."""
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f'image size {tuple(x.shape[-2:])} is not divisible by the patch size {p}')
        return self.proj(x).flatten(2).transpose(1, 2)


# -----------------------------------------------------------------------------
# the model


class VisionTransformer(nn.Module):
    """ViT with a [CLS] token.
    pos_embed: 'sincos' (fixed, MAE/LUT) or 'learned' (iBOT/DTM); mask_token: add a (1, D) mask embedding for
    the masked-token path; global_pool: 'token' ([CLS] -> norm -> head) or 'avg' (mean of patch tokens ->
    fc_norm -> head, MAE fine-tuning; the final `norm` is then Identity, as in timm); weight_init: 'mae'
    (xavier_uniform) or 'trunc_normal' (std 0.02, DINO/iBOT/BEiT); dino_interp: resize the position embedding for
    other grids with DINO / iBOT's scale-factor form (interpolate_pos_embed(dino_scale=True); iBOT's local crops)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, num_classes=1000, global_pool='token', drop_path_rate=0.0,
                 layer_scale=None, pos_embed='sincos', mask_token=False, weight_init='mae', dino_interp=False):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f'image size {img_size} is not divisible by the patch size {patch_size}')
        assert global_pool in ('token', 'avg') and pos_embed in ('sincos', 'learned')
        self.img_size, self.patch_size, self.embed_dim, self.depth = img_size, patch_size, embed_dim, depth
        self.num_heads, self.global_pool, self.num_classes = num_heads, global_pool, num_classes
        self.grid = img_size // patch_size
        self.dino_interp = dino_interp
        self.num_patches = self.grid ** 2
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if pos_embed == 'sincos':
            self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, self.grid)[None], requires_grad=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if mask_token else None
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows linearly with depth
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], layer_scale)
                                     for i in range(depth)])
        use_fc_norm = global_pool == 'avg'
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(weight_init, pos_embed == 'learned')

    def init_weights(self, kind, learned_pos):
        if kind == 'mae':  # MAE models_mae.py: xavier_uniform on Linear and on the patch conv viewed as a matrix
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(self.cls_token, std=0.02)
            if self.mask_token is not None:
                nn.init.normal_(self.mask_token, std=0.02)
        else:  # DINO / iBOT / BEiT: truncated normal; iBOT's mask token starts at zero
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if learned_pos:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if kind == 'mae':
                    nn.init.xavier_uniform_(m.weight)
                else:
                    nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def patch_pos_embed(self, h, w):
        """Position embedding for the patch tokens of an h x w grid: (1, h*w, D), interpolated if needed."""
        return interpolate_pos_embed(self.pos_embed, (h, w), dino_scale=self.dino_interp)[:, 1:]

    def embed(self, x, mask=None):
        """Pixels -> patch tokens with position embedding: (B, L, D). mask (B, L) bool: masked positions are
        replaced by the mask token before the position embedding is added (iBOT / BEiT / DTM)."""
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        t = self.patch_embed(x)  # (B, L, D)
        if mask is not None:
            assert self.mask_token is not None, 'this ViT was built without mask_token=True'
            t = torch.where(mask.reshape(t.shape[0], -1, 1), self.mask_token.to(t.dtype), t)
        return t + self.patch_pos_embed(h, w)

    def with_cls(self, t):
        """Prepend [CLS] (+ its position embedding): (B, n, D) -> (B, 1+n, D)."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(t.shape[0], -1, -1)
        return torch.cat([cls, t], dim=1)

    def forward_features(self, x, mask=None):
        """All tokens after the final norm: (B, 1+L, D)."""
        t = self.with_cls(self.embed(x, mask))
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)

    def forward_kept(self, x, ids_keep):
        """MAE encoder: only the kept patches (ids_keep (B, K)) and [CLS]; the encoder never sees mask tokens.
        Returns (B, 1+K, D) after the final norm."""
        t = self.embed(x)  # (B, L, D), position embedding added before dropping tokens
        t = torch.gather(t, 1, ids_keep[..., None].expand(-1, -1, t.shape[-1]))  # (B, K, D)
        t = self.with_cls(t)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)

    def forward_intermediates(self, x, layers, mask=None):
        """Raw outputs (B, 1+L, D) of the blocks with 1-based indices in `layers` (e.g. 4, 6, 8, 12)."""
        t, out = self.with_cls(self.embed(x, mask)), []
        for i, blk in enumerate(self.blocks, start=1):
            t = blk(t)
            if i in layers:
                out.append(t)
        return out

    @torch.no_grad()
    def forward_attention(self, x):
        """Attention maps of every block: list of (B, H, 1+L, 1+L), softmax rows sum to 1."""
        t, maps = self.with_cls(self.embed(x)), []
        for blk in self.blocks:
            t, attn = blk(t, return_attn=True)
            maps.append(attn)
        return maps

    def pool(self, t):
        """(B, 1+L, D) -> (B, D): [CLS] or the mean of patch tokens followed by fc_norm."""
        return self.fc_norm(t[:, 1:].mean(dim=1)) if self.global_pool == 'avg' else t[:, 0]

    def forward(self, x):
        return self.head(self.pool(self.forward_features(x)))


def vit(name, **kw):
    """Build a ViT by size name ('tiny', 'small', 'base', 'large', 'huge'); keyword arguments override."""
    if name not in SIZES:
        raise ValueError(f'unknown model {name!r}; choose one of {", ".join(SIZES)}')
    D, depth, heads, patch = SIZES[name]
    kw.setdefault('patch_size', patch)
    return VisionTransformer(embed_dim=D, depth=depth, num_heads=heads, **kw)


def vit_tiny(**kw): return vit('tiny', **kw)
def vit_small(**kw): return vit('small', **kw)
def vit_base(**kw): return vit('base', **kw)
def vit_large(**kw): return vit('large', **kw)
def vit_huge(**kw): return vit('huge', **kw)


def count_params(module, trainable=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


# -----------------------------------------------------------------------------
# checkpoints in the common layout

BACKBONE_PREFIXES = ('cls_token', 'pos_embed', 'patch_embed.', 'blocks.', 'norm.')


def backbone_state_dict(model):
    """The encoder in the common ViT layout (what `encoder` holds in every nanoMIM checkpoint): no mask token,
    no decoder, no head; CPU tensors, so a machine without a GPU loads it; loads into timm's ViT of the same size
    with num_classes=0."""
    sd = model.state_dict()
    return {k: v.detach().to('cpu', copy=True) for k, v in sd.items() if k.startswith(BACKBONE_PREFIXES)}


def _convert_beit(sd):
    """BEiT-style keys (q_bias/v_bias, gamma_1/gamma_2) -> common layout (qkv.bias with zero k bias, ls1/ls2)."""
    out = {}
    for k, v in sd.items():
        if k.endswith('attn.q_bias'):
            vb = sd[k.replace('q_bias', 'v_bias')]
            out[k.replace('q_bias', 'qkv.bias')] = torch.cat([v, torch.zeros_like(v), vb])
        elif k.endswith('attn.v_bias'):
            continue
        elif '.gamma_1' in k or '.gamma_2' in k:
            out[k.replace('gamma_1', 'ls1.gamma').replace('gamma_2', 'ls2.gamma')] = v
        else:
            out[k] = v
    return out


def extract_backbone(ckpt):
    """Find the backbone in any supported checkpoint object and return (state_dict in common layout, format).
    Formats: nanoMIM ({'encoder': ...}); official MAE / LUT / DTM / BEiT ({'model': ...}: LUT's online encoder, pick
    'model_ema' yourself for its teacher); iBOT / DINO ({'teacher': ...} with 'backbone.' prefix); {'state_dict': ...};
    a bare backbone state_dict; an nn.Module. Wrapper prefixes are stripped (DDP, compile, iBOT/DINO, LUT, nanoMIM),
    BEiT keys converted; relative position bias tables (BEiT / DTM) are dropped, which the format string says."""
    if isinstance(ckpt, nn.Module):
        ckpt = ckpt.state_dict()
    if not isinstance(ckpt, dict):
        raise ValueError(f'checkpoint is a {type(ckpt).__name__}, not a dict of tensors')
    if 'encoder' in ckpt and isinstance(ckpt['encoder'], dict):
        sd, fmt = ckpt['encoder'], f"nanoMIM {ckpt.get('method', '')}".strip()
    elif 'teacher' in ckpt:
        sd, fmt = ckpt['teacher'], 'ibot/dino teacher'
    elif 'model' in ckpt:
        sd, fmt = ckpt['model'], 'official (model)'
    elif 'state_dict' in ckpt:
        sd, fmt = ckpt['state_dict'], 'state_dict'
    else:
        sd, fmt = ckpt, 'bare state_dict'
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)} if isinstance(sd, dict) else {}
    if not sd:
        raise ValueError(f'checkpoint ({fmt}) holds no tensors')
    for prefix in ('module.', '_orig_mod.', 'backbone.', 'base_encoder.', 'encoder.', 'ema.'):
        if any(k.startswith(prefix) for k in sd):  # DDP, compile, iBOT/DINO wrapper, LUT, nanoMIM models
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sd = _convert_beit(sd)
    if any('relative_position' in k for k in sd):
        fmt += ', relative position bias dropped (this ViT has none)'
    sd = {k: v for k, v in sd.items() if k.startswith(BACKBONE_PREFIXES) and 'relative_position' not in k}
    if sd and 'pos_embed' not in sd:
        fmt += ', no absolute position embedding (the model keeps its own)'
    return sd, fmt


# the globals a weights-only load may build besides tensors, dtypes and plain containers: the argparse.Namespace
# ('args') of the official MAE / LUT / iBOT / DINO / BEiT / DTM checkpoints. nanoMIM's own checkpoints need none.
SAFE_GLOBALS = (argparse.Namespace,)
TRUST_HINT = 'if you trust the file, pass --trust_checkpoint'


def safe_load(path, trust=False):
    """torch.load(path) on the CPU, as data: weights_only=True with SAFE_GLOBALS allowed, so unpickling builds
    tensors, containers, numbers, strings and those classes, and nothing the file names can run. A file that asks
    for any other global is refused with one ValueError line naming the file, the global and the flag;
    trust=True (--trust_checkpoint, for a file you trust) uses Python's full unpickler, which runs whatever
    callable the file names. Any other read failure: ValueError naming the file."""
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location='cpu', weights_only=not trust)
    except pickle.UnpicklingError as e:
        asked = re.search(r'GLOBAL ([\w.]+)', str(e))
        if trust or not asked:
            raise ValueError(f'cannot read checkpoint {path} ({type(e).__name__}: {str(e).strip()[:300]})') from None
        raise ValueError(f'checkpoint {path} needs {asked.group(1)}, which is not data (unpickling it could run '
                         f'code), so it was not loaded; {TRUST_HINT}') from None
    except Exception as e:
        raise ValueError(f'cannot read checkpoint {path} ({type(e).__name__}: {str(e).strip()[:300]})') from None


def is_torchscript(path):
    """A TorchScript archive (torch.jit.save; OpenAI's released CLIP files): a zip with a constants.pkl record."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.split('/', 1)[-1] == 'constants.pkl' for name in z.namelist())


METHOD_NAMES = {'mae': 'an MAE', 'lut': 'a LUT', 'ibot': 'an iBOT', 'dtm': 'a DTM', 'finetune': 'a finetune.py',
                'seg': 'an eval_seg.py'}  # the `method` a nanoMIM checkpoint records, as a message names it


def checkpoint_kind(method):
    """'an iBOT checkpoint' for method 'ibot', 'a non-nanoMIM checkpoint' for None: what an error line calls it."""
    return f"{METHOD_NAMES.get(method, f'a {method}') if method else 'a non-nanoMIM'} checkpoint"


def read_checkpoint(path, verbose=True, trust=False):
    """Load a checkpoint file on the CPU through safe_load (weights only; trust=True: the full unpickler, see there).
    FileNotFoundError (missing) or ValueError (unreadable, or refused) with one line naming the file.
    A TorchScript archive (OpenAI's released CLIP files) gives its state_dict through torch.jit.load: that runs no
    Python pickle (TorchScript's own unpickler builds tensors and TorchScript objects only, and the model code is
    compiled but never called here), yet it trusts torch.jit.load's parser with the file, which PyTorch does not
    document as safe for untrusted input: take CLIP files from OpenAI's own download. A file over 256 MB gets a line
    before and after (with verbose), since torch.load cannot report its progress."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    size, t0 = os.path.getsize(path), time.time()
    if verbose and size > 256 * 2 ** 20:
        print(f'loading {path} ({size / 2 ** 30:.2f} GB) ...', flush=True)
    if is_torchscript(path):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings('ignore', message='.*torch.jit.load.*deprecated')
                warnings.filterwarnings('ignore', message='.*TorchScript')
                obj = torch.jit.load(path, map_location='cpu').state_dict()
        except Exception as e:
            raise ValueError(f'cannot read TorchScript checkpoint {path} ({type(e).__name__}: {e})') from None
    else:
        obj = safe_load(path, trust)
    if verbose and size > 256 * 2 ** 20:
        print(f'loaded {path} in {time.time() - t0:.0f} s ({size / 2 ** 20 / max(time.time() - t0, 1e-9):.0f} MB/s)')
    return obj


def checkpoint_arch(ckpt, num_heads=0):
    """The ViT a loaded checkpoint holds, read off its backbone tensors: dict(model (SIZES name, None for another
    size), embed_dim, depth, num_heads, patch_size, img_size, mlp_ratio, qkv_bias, layer_scale, abs_pos_embed
    (bools), format, method ('ibot' for an iBOT / DINO teacher file)). Heads are not in the weights: `num_heads`
    when given, else the size name's of (width, depth), else width / 64 (every published ViT but huge).
    img_size: the nanoMIM config's, else the position-embedding grid."""
    sd, fmt = extract_backbone(ckpt)
    if 'patch_embed.proj.weight' not in sd:
        raise ValueError(f'checkpoint ({fmt}) has no ViT backbone (no patch_embed.proj.weight)')
    D, _, p, _ = sd['patch_embed.proj.weight'].shape
    depth = 1 + max((int(k.split('.')[1]) for k in sd if k.startswith('blocks.')), default=-1)
    if depth == 0 or 'blocks.0.mlp.fc1.weight' not in sd:
        raise ValueError(f'checkpoint ({fmt}) has no transformer blocks in the common layout (blocks.0.mlp.fc1)')
    name = next((n for n, s in SIZES.items() if s[:2] == (D, depth)), None)
    heads = num_heads or (SIZES[name][2] if name else D // 64 if D % 64 == 0 else 0)
    if not heads:
        raise ValueError(f'checkpoint backbone of width {D}, depth {depth} is none of the sizes {", ".join(SIZES)}: '
                         f'its head count is not in the weights')
    config = ckpt.get('config') if isinstance(ckpt, dict) and isinstance(ckpt.get('config'), dict) else {}
    if config.get('img_size') and config['img_size'] % p == 0:
        img_size = config['img_size']
    elif 'pos_embed' in sd:
        n = sd['pos_embed'].reshape(-1, D).shape[0]
        img_size = (math.isqrt(n) if math.isqrt(n) ** 2 == n else math.isqrt(n - 1)) * p
    else:
        img_size = 224 // p * p
    method = ckpt.get('method') if isinstance(ckpt, dict) else None
    return dict(model=name, embed_dim=D, depth=depth, num_heads=heads, patch_size=p, img_size=img_size,
                mlp_ratio=sd['blocks.0.mlp.fc1.weight'].shape[0] / D, qkv_bias='blocks.0.attn.qkv.bias' in sd,
                layer_scale='blocks.0.ls1.gamma' in sd, abs_pos_embed='pos_embed' in sd, format=fmt,
                method=method or ('ibot' if fmt.startswith('ibot') else None))


def pretrained_arch(path, key='', trust=False):
    """What an evaluation script needs to know before it builds anything: (checkpoint_arch of the backbone in `path`
    (of its entry `key` when given), the nanoMIM `config` the file holds ({} for another file)). Errors as
    read_checkpoint / checkpoint_arch."""
    ckpt = read_checkpoint(path, verbose=False, trust=trust)
    config = ckpt.get('config') if isinstance(ckpt, dict) and isinstance(ckpt.get('config'), dict) else {}
    if key:
        if not isinstance(ckpt, dict) or key not in ckpt:
            keys = ', '.join(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(f'checkpoint {path} has no key {key!r} (it has: {keys})')
        ckpt = ckpt[key]
    return checkpoint_arch(ckpt), config


def load_vit(src, key='', img_size=0, model='', patch_size=0, num_heads=0, verbose=True, trust=False, **kw):
    """The one way every script gets a pre-trained ViT: read `src` (a path or a loaded checkpoint; `key` picks one
    entry of it, e.g. model_ema or student), build the VisionTransformer its backbone holds (checkpoint_arch: width,
    depth, heads, patch, MLP ratio, qkv bias, layer scale) at `img_size` (0 = the checkpoint's own; the position
    embedding is interpolated) and load the weights (load_backbone). `model` / `patch_size`, when given, must match
    the checkpoint. trust: read_checkpoint's (--trust_checkpoint). kw go to VisionTransformer (num_classes,
    global_pool, drop_path_rate, pos_embed, mask_token, ...).
    Returns (model, arch with the missing / unexpected keys). FileNotFoundError / ValueError name the problem."""
    ckpt = read_checkpoint(src, verbose, trust) if isinstance(src, str) else src
    if key:
        if not isinstance(ckpt, dict) or key not in ckpt:
            keys = ', '.join(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(f'checkpoint {src if isinstance(src, str) else ""} has no key {key!r} (it has: {keys})')
        ckpt = ckpt[key]
    arch = checkpoint_arch(ckpt, num_heads)
    D, depth, p = arch['embed_dim'], arch['depth'], arch['patch_size']
    if (model and model != arch['model']) or (patch_size and patch_size != p):
        given = (('model', model, arch['model']), ('patch_size', patch_size, p))
        asked = ' and '.join(f'{k}={v!r}' for k, v, own in given if v and v != own)  # what the checkpoint contradicts
        want = f'width {SIZES[model][0]}, depth {SIZES[model][1]}' if model in SIZES else f'ViT-{model}'
        raise ValueError(f'checkpoint backbone is width {D}, depth {depth}, patch {p} (ViT-{arch["model"] or "?"}); '
                         f'asked for {want}, patch {patch_size or p} ({asked}): drop {asked} to build the ViT the '
                         f'checkpoint holds')
    img_size = img_size or arch['img_size']
    if img_size % p:
        raise ValueError(f'image size {img_size} is not divisible by the checkpoint\'s patch size {p}')
    kw.setdefault('pos_embed', 'learned')  # the checkpoint's values load either way; 'learned' keeps them trainable
    net = VisionTransformer(img_size=img_size, patch_size=p, embed_dim=D, depth=depth, num_heads=arch['num_heads'],
                            mlp_ratio=arch['mlp_ratio'], qkv_bias=arch['qkv_bias'],
                            layer_scale=1.0 if arch['layer_scale'] else None, **kw)
    if not arch['abs_pos_embed']:  # BEiT-style backbone with relative position bias only: no absolute position
        with torch.no_grad():
            net.pos_embed.zero_()
    arch['missing'], arch['unexpected'] = load_backbone(ckpt, net, verbose, src if isinstance(src, str) else None)
    return net, arch


def as_flags(msg):
    """A load_vit error as a script's user reads it: the arguments model='tiny' / patch_size=8 / img_size=64 as the
    flags --model tiny / --patch_size 8 / --img_size 64."""
    return re.sub(r"\b(model|patch_size|img_size)=('?)([^',\s)]*)\2", r'--\1 \3', str(msg))


def load_backbone(path_or_ckpt, model, verbose=True, name=None):
    """Load a pre-trained backbone into `model` (a VisionTransformer) from a path or a loaded checkpoint:
    detects the format, maps keys, interpolates the position embedding to the model's grid, and reports
    missing/unexpected keys. A width/depth/patch or any shape mismatch raises ValueError with one clear line.
    Returns (missing_keys, unexpected_keys). `load_vit` builds the matching model first."""
    ckpt = read_checkpoint(path_or_ckpt, verbose) if isinstance(path_or_ckpt, str) else path_or_ckpt
    sd, fmt = extract_backbone(ckpt)
    if 'patch_embed.proj.weight' not in sd:
        raise ValueError(f'checkpoint ({fmt}) has no ViT backbone (no patch_embed.proj.weight)')
    D, _, p, _ = sd['patch_embed.proj.weight'].shape
    depth = 1 + max((int(k.split('.')[1]) for k in sd if k.startswith('blocks.')), default=-1)
    if (D, depth, p) != (model.embed_dim, len(model.blocks), model.patch_size):
        raise ValueError(f'checkpoint backbone is width {D}, depth {depth}, patch {p}; the model is width '
                         f'{model.embed_dim}, depth {len(model.blocks)}, patch {model.patch_size} -- build the ViT the '
                         f'checkpoint holds (load_vit)')
    if 'pos_embed' in sd:
        pe = sd['pos_embed'].reshape(1, -1, D)
        n = pe.shape[1]
        if math.isqrt(n) ** 2 == n:  # patch rows only (no [CLS] row): [CLS] gets a zero position embedding
            pe = torch.cat([pe.new_zeros(1, 1, D), pe], dim=1)
        elif math.isqrt(n - 1) ** 2 != n - 1:
            raise ValueError(f'checkpoint pos_embed has {n} rows: neither a square grid nor [CLS] + a square grid')
        sd['pos_embed'] = interpolate_pos_embed(pe, (model.grid, model.grid))
    if model.global_pool == 'avg':  # MAE fine-tuning: the pre-trained final norm is dropped, fc_norm is fresh
        sd = {k: v for k, v in sd.items() if not k.startswith('norm.')}
    own = model.state_dict()
    bad = [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in sd.items()
           if k in own and v.shape != own[k].shape]
    if bad:
        raise ValueError(f'checkpoint tensor shapes differ from the model (checkpoint vs model): {bad[0]}'
                         + (f' and {len(bad) - 1} more' if len(bad) > 1 else ''))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(('head.', 'fc_norm.', 'mask_token'))]
    if verbose:
        src = name or (path_or_ckpt if isinstance(path_or_ckpt, str) else 'checkpoint')
        print(f'loaded {len(sd)} backbone tensors from {src} (format: {fmt}); '
              f'missing: {missing or "none"}; unexpected: {list(unexpected) or "none"}')
    return missing, list(unexpected)
