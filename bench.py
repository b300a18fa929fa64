"""
bench.py -- time the real training step of a method on synthetic batches already on the device.

Prints, beside every figure, the device name, torch / CUDA versions, dtype, compile flag and batch size:
ms/step, img/s, achieved TFLOP/s from a structural FLOP count and, on a GPU, model FLOPs utilisation (MFU)
against the dense bf16 (or fp32) peak of the device.

  python bench.py                                    # MAE, embedded-size model, CPU or GPU
  python bench.py --method mae --model base --img_size 224 --patch_size 16 --batch_size 256 --compile true
  python bench.py --method lut|ibot|dtm|finetune     # the other steps, EMA / momentum update and teacher included
  python bench.py --method ibot --model base --img_size 224 --batch_size 128 --local_crops 10  # 2x224 + 10x96 px
  python bench.py --compare true                     # eager fp32 vs bf16 vs compile, with ratios
  python bench.py --loader true --img_size 224 --batch_size 256 --num_workers 10  # data path: CPU-PIL vs GPU decode

FLOP convention (nanoGPT / PaLM): one multiply-add = 2 FLOPs, matmuls only; a block on T tokens of width d costs
24*d^2*T + 4*T^2*d; a trained network costs 3x its forward (forward + backward), a frozen/EMA one 1x.
"""
import argparse
import dataclasses
import os
import platform
import random
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from PIL import Image

import data
import dtm
import ibot
import lut
import mae
import vit

# dense peak TFLOP/s by device-name fragment: (bf16/fp16, tf32/fp32); spec sheets, SXM parts
PEAKS = {'H200': (989.4, 494.7), 'H100': (989.4, 494.7), 'A100': (312.0, 156.0), 'L40S': (362.1, 181.0),
         'A10': (125.0, 62.5), 'V100': (125.0, 15.7), '4090': (165.2, 82.6), '3090': (71.0, 35.6)}


@dataclass
class Config:
    method: str = 'mae'        # mae|lut|ibot|dtm|finetune (the step that is timed)
    model: str = 'tiny'        # ViT size
    img_size: int = 64         # input resolution
    patch_size: int = 8        # patch size
    batch_size: int = 64       # images per step
    dtype: str = ''            # bf16|fp16|fp32; '' = bf16 on CUDA, fp32 on CPU
    compile: bool = False      # torch.compile the model
    steps: int = 10            # timed steps
    warmup: int = 3            # untimed steps first (compilation, allocator, cudnn autotune)
    decoder_dim: int = 0       # MAE / LUT decoder; 0 = 512 (x8 blocks, 16 heads) at >= 224 px, else 128 x 2 x 4
    local_crops: int = -1      # iBOT local crops (96 px at >= 224 px, else img_size/2); -1 = 10 at >= 224 px, else 2
    baseline: bool = False     # straightforward step: eager, single-tensor AdamW (no foreach / fused kernels)
    compare: bool = False      # run the baseline, then eager fp32, eager bf16 and compiled bf16, and print ratios
    device: str = ''           # cuda|cpu; '' = cuda if available
    loader: bool = False       # time the data path instead (bench_loader): mae.py's --decode cpu vs --decode gpu
    num_workers: int = 2       # --loader: loader worker processes
    images: int = 512          # --loader: JPEGs written to a temporary folder


# -----------------------------------------------------------------------------
# structural FLOP counts (forward, per image)


def block_flops(T, d):
    return 24 * d * d * T + 4 * T * T * d


def mae_forward_flops(D, depth, L, P, K, Dd, dec_depth):
    """Patch embed on all L patches, encoder on K+1 tokens, decoder on L+1 tokens, prediction head."""
    return (2 * L * P * D + depth * block_flops(K + 1, D) + 2 * (K + 1) * D * Dd + dec_depth * block_flops(L + 1, Dd)
            + 2 * (L + 1) * Dd * P)


def vit_forward_flops(D, depth, L, P, classes=0):
    return 2 * L * P * D + depth * block_flops(L + 1, D) + 2 * D * classes


def lut_step_flops(D, depth, L, P, K, Dd, dec_depth, Dh):
    """One LUT step (per image): online x3 + momentum x1. Online: the MAE forward of view 1, the encoder on view 2's
    K+1 tokens (patch embed on all L), head and predictor (Linear D -> Dh -> D each) on each view's pooled token.
    Momentum: the encoder on both full views (L+1 tokens) and the head on each pooled token."""
    mlp = 4 * D * Dh  # one Linear D -> Dh -> D on one vector
    online = mae_forward_flops(D, depth, L, P, K, Dd, dec_depth) + 2 * L * P * D + depth * block_flops(K + 1, D)
    return 3 * (online + 2 * 2 * mlp) + 2 * (vit_forward_flops(D, depth, L, P) + mlp)


def ibot_head_flops(T, D, H, K, bottleneck=256):
    """iBOT head on T tokens: MLP D -> H -> H -> 256, then the weight-normalised last layer 256 -> K."""
    return 2 * T * (D * H + H * H + H * bottleneck + bottleneck * K)


def ibot_step_flops(D, depth, L, P, l, n, H, K):
    """One iBOT step (per image: 2 global crops of L patches, n local crops of l patches): student x3 + teacher x1.
    A global crop: ViT on 1+L tokens (masked patches become mask tokens inside the encoder: no saving) and the head
    on all 1+L tokens; a local crop: ViT on 1+l tokens, head on [CLS] only. The student sees all 2+n crops, the EMA
    teacher the 2 global ones. Loss and centers (no weights) are not counted."""
    g = vit_forward_flops(D, depth, L, P) + ibot_head_flops(L + 1, D, H, K)
    loc = vit_forward_flops(D, depth, l, P) + ibot_head_flops(1, D, H, K)
    return 3 * (2 * g + n * loc) + 2 * g


def dtm_step_flops(D, depth, L, P):
    """One DTM step (per image) with the EMA teacher: student x3, ViT on all 1+L tokens (mask tokens inside) and
    the Linear head D -> D on the L patch tokens; teacher x1, the same ViT on the unmasked view. Not counted: the
    loss and the token morphing's matching scores (<= morph_levels * morph_k * L^2 D / 2, under 1 % of the step)."""
    return 3 * (vit_forward_flops(D, depth, L, P) + 2 * L * D * D) + vit_forward_flops(D, depth, L, P)


# -----------------------------------------------------------------------------
# the timed steps


def adamw(params, cfg, device, **kw):
    """The scripts' optimizer: fused AdamW on CUDA, multi-tensor (foreach) on CPU; the baseline uses neither."""
    cuda = device.startswith('cuda')
    if cfg.baseline:
        return torch.optim.AdamW(params, lr=1e-4, foreach=False, fused=False, **kw)
    return torch.optim.AdamW(params, lr=1e-4, fused=cuda, foreach=not cuda, **kw)


def script_config(module, cfg, *flags, recipe=()):
    """module.get_config at bench's model size: the script's defaults, with the `recipe` keys taken from its paper
    recipe (module.RECIPE) at >= 224 px and from its embedded CPU defaults (module.EMBEDDED) below."""
    table = module.RECIPE if cfg.img_size >= 224 else module.EMBEDDED
    argv = ['--model', cfg.model, '--img_size', str(cfg.img_size), '--patch_size', str(cfg.patch_size)]
    return module.get_config(argv + [a for k in recipe for a in (f'--{k}', str(table[k]))] + list(flags))


def decoder_config(module, cfg):
    """MAE / LUT: the decoder of the script's recipe (512 x 8 blocks x 16 heads) or embedded default (128 x 2 x 4)."""
    return script_config(module, cfg, *(['--decoder_dim', str(cfg.decoder_dim)] if cfg.decoder_dim else []),
                         recipe=('decoder_dim', 'decoder_depth', 'decoder_heads'))


def make_mae_step(cfg, device, autocast):
    mcfg = decoder_config(mae, cfg)
    dd, depth = mcfg.decoder_dim, mcfg.decoder_depth
    model = mae.MAE(mcfg).to(device)
    opt = adamw(mae.param_groups(model, 0.05), cfg, device, betas=(0.9, 0.95))
    fwd = torch.compile(model) if cfg.compile else model
    L = model.num_patches
    imgs = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device)
    noise = torch.rand(cfg.batch_size, L, device=device)
    D, P = model.encoder.embed_dim, cfg.patch_size ** 2 * 3
    K = int(L * (1 - mcfg.mask_ratio))
    flops = 3 * mae_forward_flops(D, len(model.encoder.blocks), L, P, K, dd, depth)

    def step():
        with autocast:
            loss, _, _ = fwd(imgs, noise, mcfg.mask_ratio, True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, flops, vit.count_params(model)


def make_lut_step(cfg, device, autocast):
    """lut.py's step: MAE loss on view 1 + L_BC against the momentum branch on both full views, AdamW, EMA."""
    lcfg = decoder_config(lut, cfg)
    model = lut.LUT(lcfg).to(device)
    momentum = lut.Momentum(model)
    tracked = lut.tracked(model)
    opt = adamw(lut.param_groups(model, lcfg.weight_decay), cfg, device, betas=(0.9, 0.95))
    fwd = torch.compile(model) if cfg.compile else model
    target = torch.compile(momentum) if cfg.compile else momentum
    B, L = cfg.batch_size, model.num_patches
    view1, view2 = (torch.randn(B, 3, cfg.img_size, cfg.img_size, device=device) for _ in range(2))
    noise = torch.rand(B, L, device=device)
    K = int(L * (1 - lcfg.mask_ratio))
    flops = lut_step_flops(model.encoder.embed_dim, model.encoder.depth, L, cfg.patch_size ** 2 * 3, K,
                           lcfg.decoder_dim, lcfg.decoder_depth, lcfg.head_dim)

    def step():
        with autocast:
            loss_mae, q1, q2, _, _ = fwd(view1, view2, noise, lcfg.mask_ratio, lcfg.norm_pix_loss)
            z1, z2 = target(view1), target(view2)  # (B, D) each, no grad
            loss = lcfg.w_mae * loss_mae + lcfg.w_bc * lut.bc_loss(q1, q2, z1, z2)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        lut.ema_update(momentum, tracked, lcfg.momentum)
    return step, flops, vit.count_params(model)


def make_ibot_step(cfg, device, autocast):
    """ibot.py's step after the first epoch: EMA teacher on the 2 global crops, student on the masked globals and
    the local crops, L_CLS + L_MIM, per-tensor gradient clip, AdamW, EMA, center update."""
    big, p = cfg.img_size >= 224, cfg.patch_size
    n = cfg.local_crops if cfg.local_crops >= 0 else (10 if big else 2)
    ls = max(p, round((96 if big else cfg.img_size // 2) / p) * p)  # local crop size, a multiple of the patch
    icfg = script_config(ibot, cfg, '--local_size', str(ls), '--local_crops_number', str(n),
                         recipe=('out_dim', 'head_hidden'))
    model = ibot.iBOT(icfg, drop_path=icfg.drop_path).to(device)
    teacher = ibot.build_teacher(model)
    opt = adamw(ibot.param_groups(model, icfg.weight_decay), cfg, device)
    fwd = torch.compile(model) if cfg.compile else model
    teacher_fwd = torch.compile(teacher) if cfg.compile else teacher
    B, L, K = cfg.batch_size, model.backbone.num_patches, icfg.out_dim
    globals_ = torch.randn(2 * B, 3, cfg.img_size, cfg.img_size, device=device)  # (G*B, 3, H, W)
    locals_ = torch.randn(n * B, 3, ls, ls, device=device) if n else None  # (n*B, 3, h, w)
    # (G*B, L) bool: about pred_ratio of the patches masked, a no_mask_prob share of the crops unmasked (recipe)
    mask = torch.rand(2 * B, L, device=device) < icfg.pred_ratio
    mask &= torch.rand(2 * B, 1, device=device) >= icfg.no_mask_prob
    temps = (icfg.teacher_temp, icfg.teacher_patch_temp)
    centers = [torch.zeros(1, K, device=device), torch.zeros(1, 1, K, device=device)]
    flops = ibot_step_flops(model.backbone.embed_dim, model.backbone.depth, L, p * p * 3, (ls // p) ** 2, n,
                            icfg.head_hidden, K)

    def step():
        with autocast:
            with torch.no_grad():
                t_cls, t_patch = teacher_fwd(globals_)  # (G*B, K), (G*B, L, K)
            s_cls, s_patch = fwd(globals_, locals_, mask)  # (V*B, K), (G*B, L, K)
        loss, _ = ibot.ibot_loss(s_cls, s_patch, t_cls, t_patch, mask, *centers, temps, icfg.student_temp,
                                 (icfg.lambda1, icfg.lambda2))  # fp32, outside autocast
        loss.backward()
        ibot.clip_per_tensor_(model.parameters(), icfg.clip_grad)  # (cancel_last_layer_grads: first epoch only)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ibot.ema_update(teacher, model, icfg.momentum_teacher)
        centers[:] = ibot.update_centers(*centers, ibot.center_sums(t_cls, t_patch), t_cls.shape[0],
                                     icfg.center_momentum)  # 2B teacher rows
    return step, flops, vit.count_params(model)


def make_dtm_step(cfg, device, autocast):
    """dtm.py's step with the EMA teacher: teacher tokens of the unmasked view, draw_clusters, student on the
    masked view with dtm_loss over the morphings, gradient clip, AdamW, EMA."""
    dcfg = script_config(dtm, cfg, recipe=('ema_momentum',))
    model = dtm.DTM(dcfg).to(device)
    teacher = dtm.build_teacher(dcfg, model.encoder).to(device)  # frozen EMA copy, eval mode, never compiled
    opt = adamw(dtm.param_groups(model, dcfg.weight_decay), cfg, device, betas=(0.9, 0.999))
    fwd = torch.compile(model) if cfg.compile else model
    B, L = cfg.batch_size, model.encoder.num_patches
    imgs = torch.randn(B, 3, cfg.img_size, cfg.img_size, device=device)
    mask = torch.zeros(B, L, dtype=torch.bool, device=device)  # (B, L), exactly num_mask True per image
    mask.scatter_(1, torch.rand(B, L, device=device).argsort(dim=1)[:, :dcfg.num_mask], True)
    rng = random.Random(0)  # morph schedules, a new draw every step as in training
    flops = dtm_step_flops(model.encoder.embed_dim, model.encoder.depth, L, cfg.patch_size ** 2 * 3)
    if cfg.compile:  # the two graphs a run builds first, before timing: one cluster count M, then any M >= 2
        with torch.no_grad():
            target = teacher(imgs).float()
        ids = torch.arange(L, device=device).repeat(B, 1)  # (B, L), contiguous and one tensor per morphing, as drawn
        for assign, M in ((ids, L), (ids // 2, (L + 1) // 2)):
            with autocast:
                loss = fwd(imgs, mask, target, [(assign.clone(), M) for _ in range(dcfg.morph_levels)])
            loss.backward()
        opt.zero_grad(set_to_none=True)

    def step():
        with torch.no_grad(), autocast:
            target = teacher(imgs).float()  # (B, L, C), unmasked view
        clusters = dtm.draw_clusters(target, rng, dcfg)  # morph_levels x (assign (B, L), M)
        with autocast:
            loss = fwd(imgs, mask, target, clusters)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), dcfg.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dtm.ema_update(teacher.encoder, model.encoder, dcfg.ema_momentum)
    return step, flops, vit.count_params(model)


def make_finetune_step(cfg, device, autocast):
    model = vit.vit(cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=1000,
                    global_pool='avg', drop_path_rate=0.1).to(device)
    opt = adamw(model.parameters(), cfg, device)
    fwd = torch.compile(model) if cfg.compile else model
    imgs = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device)
    target = torch.randint(0, 1000, (cfg.batch_size,), device=device)
    flops = 3 * vit_forward_flops(model.embed_dim, model.depth, model.num_patches, cfg.patch_size ** 2 * 3, 1000)

    def step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(fwd(imgs), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, flops, vit.count_params(model)


STEPS = {'mae': make_mae_step, 'lut': make_lut_step, 'ibot': make_ibot_step, 'dtm': make_dtm_step,
         'finetune': make_finetune_step}


def peak_tflops(device, dtype):
    if not device.startswith('cuda'):
        return None
    name = torch.cuda.get_device_name(device)
    for k, v in PEAKS.items():
        if k in name:
            return v[0] if dtype in ('bf16', 'fp16') else v[1]
    return None


def bench(cfg):
    """Time cfg.steps steps after cfg.warmup; returns a dict of what was measured and on what."""
    device = cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    dtype = cfg.dtype or ('bf16' if device_type == 'cuda' else 'fp32')
    ptdtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}[dtype]
    autocast = nullcontext() if dtype == 'fp32' else torch.autocast(device_type, dtype=ptdtype)
    torch.manual_seed(0)
    step, flops, nparams = STEPS[cfg.method](cfg, device, autocast)
    sync = torch.cuda.synchronize if device_type == 'cuda' else (lambda: None)
    if device_type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    for _ in range(cfg.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / cfg.steps
    tflops = flops * cfg.batch_size / dt / 1e12
    peak = peak_tflops(device, dtype)
    return {
        'method': cfg.method, 'model': f'{cfg.model}/{cfg.patch_size}@{cfg.img_size}', 'params_M': round(nparams / 1e6, 2),
        'batch': cfg.batch_size, 'dtype': dtype, 'compile': cfg.compile, 'baseline': cfg.baseline, 'ms_per_step': round(dt * 1e3, 2),
        'img_per_s': round(cfg.batch_size / dt, 1), 'gflop_per_img': round(flops / 1e9, 3), 'tflop_per_s': round(tflops, 3),
        'mfu': round(tflops / peak, 4) if peak else None,
        'peak_mem_GiB': round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device_type == 'cuda' else None,
        'device': torch.cuda.get_device_name(device) if device_type == 'cuda' else f'CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads',
        'torch': torch.__version__, 'cuda': torch.version.cuda,
    }


# -----------------------------------------------------------------------------
# --loader: images/s from JPEG files to normalised batches on the device, mae.py's two data paths


def write_jpegs(root, n, size=(500, 375), classes=4):
    """n JPEGs of ImageNet's typical 500x375 in root/c<k>/: smooth random colours plus grain, quality 90, so that
    files (about 80 KB) and decode cost are photo-like rather than flat colour."""
    rng = np.random.default_rng(0)
    for k in range(n):
        os.makedirs(os.path.join(root, f'c{k % classes}'), exist_ok=True)
        smooth = Image.fromarray((rng.random((6, 8, 3)) * 200).astype(np.uint8)).resize(size, Image.BICUBIC)
        img = np.asarray(smooth) + rng.integers(0, 48, (size[1], size[0], 3), dtype=np.uint8)  # (H, W, 3) uint8
        Image.fromarray(img).save(os.path.join(root, f'c{k % classes}', f'{k}.jpg'), quality=90)


def bench_loader(cfg):
    """cpu-pil: mae.py --decode cpu, PIL decode + RandomResizedCrop + flip in cfg.num_workers workers, then the
    uint8 copy to the device and the normalisation there. gpu: mae.py --decode gpu, the workers read bytes and draw
    the boxes, data.gpu_decode_batch decodes + crops + flips on the device (on the CPU when there is none:
    device=cpu), then the normalisation.
    One warm-up batch, then cfg.steps timed batches (files in the page cache after the first epoch)."""
    device = cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    cuda = device.startswith('cuda')
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    L = (cfg.img_size // cfg.patch_size) ** 2
    results = []
    with tempfile.TemporaryDirectory() as root:
        write_jpegs(root, cfg.images)
        for path in ('cpu-pil', 'gpu'):
            gpu = path == 'gpu'
            crop = data.CropFlipParams(cfg.img_size) if gpu else data.mae_transform(cfg.img_size, normalize=False)
            ds = data.Seeded(data.build_dataset(root, encoded=gpu), data.WithNoise(crop, L))
            loader, sampler = data.make_loader(ds, cfg.batch_size, num_workers=cfg.num_workers, pin_memory=cuda,
                                               collate_fn=data.collate_encoded if gpu else None)
            stream = data.batches(loader, sampler, 0)

            def batch():  # the lines of mae.py's loop up to the forward: (B, 3, S, S) float + (B, L) noise on device
                (imgs, noise), _ = next(stream)[1]
                imgs = data.gpu_decode_batch(*imgs, cfg.img_size, device) if gpu else imgs  # uint8 either way
                return data.to_device(imgs, device), noise.to(device, non_blocking=True)
            batch()
            sync()
            t0 = time.perf_counter()
            for _ in range(cfg.steps):
                batch()
            sync()
            dt = time.perf_counter() - t0
            stream.close()  # ends the persistent workers before the next path starts its own
            r = {'path': path, 'img_per_s': round(cfg.steps * cfg.batch_size / dt, 1), 'num_workers': cfg.num_workers,
                 'batch': cfg.batch_size, 'img_size': cfg.img_size, 'images': cfg.images,
                 'device': torch.cuda.get_device_name(device) if cuda else 'cpu', 'cpus': os.cpu_count(),
                 'torch': torch.__version__, 'torchvision': torchvision.__version__}
            print(' '.join(f'{k}={v}' for k, v in r.items()), flush=True)
            results.append(r)
    return results


def get_config(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.type is bool:
            p.add_argument(f'--{f.name}', type=lambda s: s.lower() in ('1', 'true', 'yes', 'on'), default=f.default)
        else:
            p.add_argument(f'--{f.name}', type=f.type, default=f.default)
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.method not in STEPS:
        p.error(f'--method must be one of {", ".join(STEPS)}')
    return cfg


def main(argv=None):
    cfg = get_config(argv)
    if cfg.loader:
        return bench_loader(cfg)
    runs = [cfg]
    if cfg.compare:
        runs = [dataclasses.replace(cfg, dtype='fp32', compile=False, baseline=True),
                dataclasses.replace(cfg, dtype='fp32', compile=False), dataclasses.replace(cfg, dtype='bf16', compile=False),
                dataclasses.replace(cfg, dtype='bf16', compile=True)]
    results = []
    for c in runs:
        r = bench(c)
        results.append(r)
        print(' '.join(f'{k}={v}' for k, v in r.items()), flush=True)
    if cfg.compare:
        base = results[0]['img_per_s']
        for r in results[1:]:
            print(f"{r['dtype']} compile={r['compile']} vs baseline (eager fp32, single-tensor AdamW): "
                  f"{r['img_per_s'] / base:.2f}x img/s")
    return results


if __name__ == '__main__':
    main()
