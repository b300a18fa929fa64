"""
bench.py -- time each method's real training step, the `train_step` its main() runs, on synthetic batches already
on the device; or run the whole one-GPU check (--suite).

Each method is built as its main() builds it (model, teacher, centers, AdamW, GradScaler, autocast; config from its
own get_config: the paper's recipe at >= 224 px, the embedded defaults below), the batches have the shapes main()
passes, and every step calls <method>.schedules and <method>.train_step. Prints, beside every figure, the device,
torch / CUDA versions, dtype, compile flag and batch: ms/step, img/s, achieved TFLOP/s from a structural FLOP count,
peak memory and, on a GPU, model FLOPs utilisation (MFU) against the device's dense peak, which is printed too.
On CUDA, TF32 is enabled for matmuls and cuDNN (as every script does), so fp32 rows divide by the TF32 peak.

  python bench.py                                    # MAE, embedded sizes (ViT-Tiny/8, 64 px), CPU or GPU
  python bench.py --method mae --model base --img_size 224 --patch_size 16 --compile true   # the recipe's batch
  python bench.py --method lut|ibot|dtm|finetune     # the other steps, teacher / EMA / centers included
  python bench.py --method ibot --model base --img_size 224 --method_args '--local_crops_number 10'
  python bench.py --compare true                     # eager fp32 vs bf16 vs compile, with ratios
  python bench.py --loader true --img_size 224 --batch_size 256 --num_workers 10  # data path: CPU-PIL vs GPU decode
  python bench.py --suite                            # the GPU check: tests, every step, data path, a 200-step run
  python bench.py --suite --device cpu               # its dry run at mini sizes (minutes on a CPU)

The suite (on one GPU, within --budget_s: 7.5 minutes by default) prints as it goes and writes suite.md (one table,
the hardware beside every figure) and suite.json into --out_dir: nvidia-smi, torch / CUDA versions; the CUDA tests
(`pytest tests -m cuda`); every method's step at ViT-B/16, 224 px, bf16, eager and compiled; MAE ViT-L/16; the data
path (PIL workers vs --decode gpu); a 200-step embedded `mae.py` run. Each part is guarded: a failure is reported
and the next part runs; a part that would not fit in the time left is skipped and says so.

FLOP convention (nanoGPT / PaLM): one multiply-add = 2 FLOPs, matmuls only; a block on T tokens of width d costs
24*d^2*T + 4*T^2*d; a trained network costs 3x its forward (forward + backward), a frozen/EMA one 1x.
"""
import argparse
import dataclasses
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from PIL import Image

import data
import dtm
import finetune
import ibot
import lut
import mae
import vit

# Dense peak TFLOP/s as (device-name fragment, name, bf16/fp16, tf32); the first fragment found in the name wins.
# Spec sheets quote Hopper's tensor-core figures with 2:4 sparsity; these are half of them. torch names the parts
# 'NVIDIA H100 80GB HBM3' (SXM), 'NVIDIA H100 PCIe', 'NVIDIA H100 NVL', 'NVIDIA H200', 'NVIDIA H200 NVL'.
PEAKS = (
    ('GH200', 'GH200', 989.4, 494.7),
    ('H200 NVL', 'H200 NVL', 835.5, 417.5),  # 1,671 / 835 sparse
    ('H200', 'H200 SXM', 989.4, 494.7),      # the H100 SXM's compute with more memory
    ('H100 NVL', 'H100 NVL', 835.5, 417.5),  # 1,671 / 835 sparse
    ('H100 PCIe', 'H100 PCIe', 756.5, 378.0),  # 1,513 / 756 sparse
    ('H100', 'H100 SXM', 989.4, 494.7),      # 1,979 / 989 sparse
    ('A100', 'A100', 312.0, 156.0),
    ('L40S', 'L40S', 362.1, 181.0),
    ('A10', 'A10', 125.0, 62.5),
    ('V100', 'V100', 125.0, 15.7),        # no TF32: plain fp32
    ('4090', 'RTX 4090', 165.2, 82.6),
    ('3090', 'RTX 3090', 71.0, 35.6),
)
METHODS = ('mae', 'lut', 'ibot', 'dtm', 'finetune')
MODULES = {'mae': mae, 'lut': lut, 'ibot': ibot, 'dtm': dtm}
START = 500  # the timed steps are optimizer steps START, START + 1, ... of a 1000-step schedule: past every warm-up


@dataclass
class Config:
    method: str = 'mae'        # mae|lut|ibot|dtm|finetune (the step that is timed)
    model: str = 'tiny'        # ViT size
    img_size: int = 64         # input resolution; >= 224 takes the method's recipe (folder regime), else embedded
    patch_size: int = 8        # patch size
    batch_size: int = 0        # images per step; 0 = the method's per-process batch at these sizes
    dtype: str = ''            # bf16|fp16|fp32; '' = bf16 on CUDA, fp32 on CPU (fp32 matmuls in TF32 on CUDA)
    compile: bool = False      # torch.compile the model (and the teacher where main() compiles it)
    compile_backend: str = 'inductor'  # torch.compile backend (the suite's CPU dry run: aot_eager, graphs only)
    steps: int = 10            # timed steps
    warmup: int = 3            # untimed steps first (compilation, allocator, cudnn autotune)
    method_args: str = ''      # more flags for the method's get_config, e.g. '--local_crops_number 10'
    baseline: bool = False     # straightforward step: eager, single-tensor AdamW (no foreach / fused kernels)
    compare: bool = False      # run the baseline, then eager fp32, eager bf16 and compiled bf16, and print ratios
    device: str = ''           # cuda|cuda:N|cpu; '' = cuda if available
    peak_tflops: float = 0.0   # MFU denominator; 0 = the device's dense spec-sheet peak for the dtype (PEAKS)
    loader: bool = False       # time the data path instead (bench_loader): mae.py's --decode cpu vs --decode gpu
    num_workers: int = 2       # --loader: loader worker processes
    images: int = 512          # --loader: JPEGs written to a temporary folder
    suite: bool = False        # the one-GPU check (see the header); --device cpu runs it at mini sizes
    parts: str = ''            # --suite: comma-separated subset of SUITE_PARTS; '' = all
    budget_s: float = 450.0    # --suite: parts that would end past this many seconds are skipped
    out_dir: str = 'out/bench'  # --suite: suite.md, suite.json, the mae.py run


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
# each method's step as its main() runs it, on synthetic device batches


def method_config(module, cfg, *flags):
    """module.get_config at bench's sizes: the method's recipe (REGIMES['folder']) at >= 224 px, its embedded
    defaults below, then bench's model, image, patch and batch size, dtype and compile flag, then cfg.method_args."""
    regime = module.REGIMES['folder' if cfg.img_size >= 224 else 'embedded']
    argv = [a for k, v in regime.items() for a in (f'--{k}', str(v))]
    argv += ['--model', cfg.model, '--img_size', str(cfg.img_size), '--patch_size', str(cfg.patch_size),
             '--dtype', cfg.dtype, '--compile', str(cfg.compile), '--device', cfg.device]
    argv += ['--batch_size', str(cfg.batch_size)] if cfg.batch_size else []
    return module.get_config(argv + list(flags) + shlex.split(cfg.method_args))


# what a step builder returns: run(i) does optimizer step i and returns the method's STATS (a device tensor); flops
# per image; parameters; batch; dtype name; warmup: steps a compiled run needs before timing beyond --warmup
Step = namedtuple('Step', 'run flops params batch dtype warmup', defaults=(0,))


def adamw(groups, cfg, device_type, **kw):
    """main()'s optimizer: fused AdamW on CUDA, multi-tensor (foreach) on CPU; the baseline uses neither."""
    cuda = device_type == 'cuda' and not cfg.baseline
    return torch.optim.AdamW(groups, lr=1e-4, fused=cuda, foreach=not cuda and not cfg.baseline, **kw)


def images(B, size, device):
    return torch.randn(B, 3, size, size, device=device)  # (B, 3, S, S), normalised-image statistics


def make_mae_step(cfg, device):
    mcfg = method_config(mae, cfg)
    dtype, autocast, scaler = mae.setup_precision(mcfg, device.split(':')[0])
    model = mae.MAE(mcfg).to(device)
    optimizer = adamw(mae.param_groups(model, mcfg.weight_decay), cfg, device.split(':')[0], betas=(0.9, 0.95))
    fwd = torch.compile(model, backend=cfg.compile_backend) if mcfg.compile else model
    B, L = mcfg.batch_size, model.num_patches
    batches = [(images(B, mcfg.img_size, device), torch.rand(B, L, device=device))]  # (imgs, noise (B, L))
    K = int(L * (1 - mcfg.mask_ratio))
    flops = 3 * mae_forward_flops(model.encoder.embed_dim, model.encoder.depth, L, mcfg.patch_size ** 2 * 3, K,
                                  mcfg.decoder_dim, mcfg.decoder_depth)

    def step(i):
        torch.manual_seed(mae.step_seed(mcfg.seed, 0, i))
        sched = mae.schedules(i, mcfg, 1e-4, 10, 2 * START)
        return mae.train_step(fwd, model, optimizer, scaler, autocast, batches, sched, mcfg)
    return Step(step, flops, vit.count_params(model), B, dtype)


def make_lut_step(cfg, device):
    lcfg = method_config(lut, cfg)
    dtype, autocast, scaler = lut.setup_precision(lcfg, device.split(':')[0])
    model = lut.LUT(lcfg).to(device)
    teacher = lut.Momentum(model)
    optimizer = adamw(lut.param_groups(model, lcfg.weight_decay), cfg, device.split(':')[0], betas=(0.9, 0.95))
    fwd = torch.compile(model, backend=cfg.compile_backend) if lcfg.compile else model
    if lcfg.compile:  # in place, as main() does: the EMA pairs parameters by name
        teacher.compile(backend=cfg.compile_backend)
    B, L, S = lcfg.batch_size, model.num_patches, lcfg.img_size
    batches = [(images(B, S, device), images(B, S, device), torch.rand(B, L, device=device))]  # view1, view2, noise
    K = int(L * (1 - lcfg.mask_ratio))
    flops = lut_step_flops(model.encoder.embed_dim, model.encoder.depth, L, lcfg.patch_size ** 2 * 3, K,
                           lcfg.decoder_dim, lcfg.decoder_depth, lcfg.head_dim)

    def step(i):
        torch.manual_seed(lut.step_seed(lcfg.seed, 0, i))
        sched = lut.schedules(i, lcfg, 1e-4, 10, 2 * START)
        return lut.train_step(fwd, model, teacher, optimizer, scaler, autocast, batches, sched, lcfg)
    return Step(step, flops, vit.count_params(model), B, dtype)


def make_ibot_step(cfg, device):
    """Local crops at the recipe's share of the global size (96 of 224 px, 32 of 64), a multiple of the patch;
    block masks drawn by ibot.MultiCropMasks, as the loader draws them."""
    regime = ibot.REGIMES['folder' if cfg.img_size >= 224 else 'embedded']
    p = cfg.patch_size
    local = max(p, round(cfg.img_size * regime['local_size'] / regime['img_size'] / p) * p)
    icfg = method_config(ibot, cfg, '--local_size', str(local))
    dtype, autocast, scaler = ibot.setup_precision(icfg, device.split(':')[0])
    model = ibot.iBOT(icfg, drop_path=icfg.drop_path).to(device)
    teacher = ibot.build_teacher(model)
    centers = ibot.Centers(icfg.out_dim).to(device)
    optimizer = adamw(ibot.param_groups(model, icfg.weight_decay), cfg, device.split(':')[0])
    fwd = torch.compile(model, backend=cfg.compile_backend) if icfg.compile else model
    if icfg.compile:  # in place, as main() does: the EMA pairs parameters by name
        teacher.compile(backend=cfg.compile_backend)
    B, L, n, ls = icfg.batch_size, model.backbone.num_patches, icfg.local_crops_number, icfg.local_size
    rng = np.random.default_rng(0)
    masks = torch.stack([ibot.MultiCropMasks(icfg).masks(rng) for _ in range(B)])  # (B, G, h, w), as collated
    mask = masks.to(device).transpose(0, 1).flatten(2).flatten(0, 1)  # (G*B, L) bool, view-major as in main()
    batches = [(images(2 * B, icfg.img_size, device), images(n * B, ls, device) if n else None, mask)]
    flops = ibot_step_flops(model.backbone.embed_dim, model.backbone.depth, L, p * p * 3, (ls // p) ** 2, n,
                            icfg.head_hidden, icfg.out_dim)

    def step(i):  # steps_per_epoch 100: epoch 5, masking on, the head's last layer no longer frozen
        torch.manual_seed(ibot.step_seed(icfg.seed, 0, i))
        sched = ibot.schedules(i, icfg, 1e-4, 10, 2 * START, 100)
        return ibot.train_step(fwd, model, teacher, centers, optimizer, scaler, autocast, batches, sched, icfg)
    return Step(step, flops, vit.count_params(model), B, dtype)


def dtm_warmup_morphs(L, levels):
    """Morph schedules for the first steps of a compiled DTM run, so that the graphs a run builds are built before
    timing: no merge (M = L clusters in every level: the first graph, M static), then other counts (M dynamic), each
    level its own, so that no graph assumes the levels' counts equal. M = 1, which dynamo would specialise, is
    never drawn at 64 patches or more (morph_schedule: at least 4 clusters at L = 64, 7 at L = 196)."""
    cases = [[[] for _ in range(levels)], [[L // 4 + j] for j in range(levels)]]
    return [[c] for c in cases]  # per step: accum_iter (1) x morph_levels schedules


def make_dtm_step(cfg, device):
    dcfg = method_config(dtm, cfg)
    dtype, autocast, scaler = dtm.setup_precision(dcfg, device.split(':')[0])
    model = dtm.DTM(dcfg).to(device)
    teacher = dtm.build_teacher(dcfg, model.encoder).to(device)  # --teacher ema: frozen EMA copy, eval mode
    optimizer = adamw(dtm.param_groups(model, dcfg.weight_decay), cfg, device.split(':')[0], betas=(0.9, 0.999))
    fwd = torch.compile(model, backend=cfg.compile_backend) if dcfg.compile else model
    B, L, grid = dcfg.batch_size, model.encoder.num_patches, dcfg.img_size // dcfg.patch_size
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(np.stack([dtm.exact_block_mask(grid, grid, dcfg.num_mask, rng).reshape(-1)
                                      for _ in range(B)])).to(device)  # (B, L) bool, num_mask True per image
    batches = [(images(B, dcfg.img_size, device), mask)]
    flops = dtm_step_flops(model.encoder.embed_dim, model.encoder.depth, L, dcfg.patch_size ** 2 * 3)
    pre = dtm_warmup_morphs(L, dcfg.morph_levels) if dcfg.compile else []

    def step(i):  # the first steps of a compiled run take the pre-set morphings, the rest draw theirs
        torch.manual_seed(dtm.step_seed(dcfg.seed, 0, i))
        sched = dtm.schedules(i, dcfg, 1e-4, 10, 2 * START)
        if i - START < len(pre):
            sched['morph'] = pre[i - START]
        return dtm.train_step(fwd, model, teacher, optimizer, scaler, autocast, batches, sched, dcfg)
    return Step(step, flops, vit.count_params(model), B, dtype, len(pre))


def make_finetune_step(cfg, device):
    """finetune.py's step (--mode finetune, the MAE recipe): its ViT with average pooling and a 1000-class head,
    layer-decay AdamW groups, mixup / cutmix, label smoothing, finetune.train_step."""
    fcfg = finetune.get_config(['--checkpoint', 'none', '--model', cfg.model, '--img_size', str(cfg.img_size),
                                '--patch_size', str(cfg.patch_size), '--dtype', cfg.dtype, '--device', cfg.device]
                               + (['--data', '/'] if cfg.img_size >= 224 else [])  # the folder recipe's knobs
                               + (['--batch_size', str(cfg.batch_size)] if cfg.batch_size else [])
                               + shlex.split(cfg.method_args))
    device_type = device.split(':')[0]
    dtype, autocast, scaler = finetune.setup_precision(fcfg, device_type)
    num_classes, B = 1000, fcfg.batch_size
    model = finetune.build_backbone(fcfg, num_classes, verbose=False).to(device)
    model.pos_embed.requires_grad_(True)
    optimizer = adamw(finetune.param_groups(model, fcfg.weight_decay, fcfg.layer_decay), cfg, device_type,
                      betas=(0.9, 0.999))
    fwd = torch.compile(model, backend=cfg.compile_backend) if cfg.compile else model
    mixer = finetune.batch_mixer(fcfg.mixup, fcfg.cutmix, num_classes)
    batches = [(images(B, fcfg.img_size, device), torch.randint(0, num_classes, (B,), device=device))]
    flops = 3 * vit_forward_flops(model.embed_dim, model.depth, model.num_patches, fcfg.patch_size ** 2 * 3,
                                  num_classes)

    def step(i):
        torch.manual_seed(finetune.step_seed(fcfg.seed, 0, i))
        sched = {'lr': finetune.lr_at(i, 1e-4, 1e-6, 10, 2 * START)}
        return finetune.train_step(fwd, model, None, optimizer, scaler, autocast, batches, sched, fcfg, num_classes,
                                   mixer, fcfg.smoothing)
    return Step(step, flops, vit.count_params(model), B, dtype)


STEPS = {'mae': make_mae_step, 'lut': make_lut_step, 'ibot': make_ibot_step, 'dtm': make_dtm_step,
         'finetune': make_finetune_step}


def peak(device, dtype, override=0.0):
    """(TFLOP/s, what it is) that MFU divides by: the dense bf16 / fp16 peak, or TF32 for fp32 (TF32 is on)."""
    if override:
        return override, f'{override:g} (--peak_tflops)'
    if not device.startswith('cuda'):
        return None, None
    name = torch.cuda.get_device_name(device)
    for fragment, part, half, tf32 in PEAKS:
        if fragment in name:
            v, kind = (half, dtype) if dtype in ('bf16', 'fp16') else (tf32, 'tf32')
            return v, f'{v:g} ({part} dense {kind})'
    return None, f'unknown for {name!r}: set --peak_tflops'


def setup_device(flag):
    """--device -> 'cuda:N' or 'cpu', with TF32 for fp32 matmuls and convolutions on CUDA (as the scripts set)."""
    device = mae.resolve_device(flag, 0, False, torch.cuda.is_available())
    if device.startswith('cuda'):
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


def hardware(device):
    if device.startswith('cuda'):
        return torch.cuda.get_device_name(device)
    return f'CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads'


def bench(cfg):
    """Time cfg.steps steps after cfg.warmup; returns a dict of what was measured and on what."""
    device = setup_device(cfg.device)
    cuda = device.startswith('cuda')
    torch.manual_seed(0)
    s = STEPS[cfg.method](dataclasses.replace(cfg, device=device), device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    warmup = cfg.warmup + s.warmup
    for i in range(START, START + warmup):
        s.run(i)
    sync()
    graphs = torch._dynamo.utils.counters['stats']['unique_graphs']
    t0 = time.perf_counter()
    for i in range(START + warmup, START + warmup + cfg.steps):
        stats = s.run(i)
    sync()
    dt = (time.perf_counter() - t0) / cfg.steps
    tflops = s.flops * s.batch / dt / 1e12
    peak_v, peak_s = peak(device, s.dtype, cfg.peak_tflops)
    return {
        'method': cfg.method, 'model': f'{cfg.model}/{cfg.patch_size}@{cfg.img_size}',
        'params_M': round(s.params / 1e6, 2), 'batch': s.batch, 'dtype': s.dtype, 'compile': cfg.compile,
        'baseline': cfg.baseline, 'ms_per_step': round(dt * 1e3, 2), 'img_per_s': round(s.batch / dt, 1),
        'gflop_per_img': round(s.flops / 1e9, 3), 'tflop_per_s': round(tflops, 3),
        'mfu': round(tflops / peak_v, 4) if peak_v else None, 'peak_tflops': peak_s,
        'peak_mem_GiB': round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
        'loss': round(stats[0].item(), 4), 'finite': bool(torch.isfinite(stats).all()),
        'recompiles_timed': torch._dynamo.utils.counters['stats']['unique_graphs'] - graphs,
        'device': hardware(device), 'torch': torch.__version__, 'cuda': torch.version.cuda,
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
    device = setup_device(cfg.device)
    cuda = device.startswith('cuda')
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    L = (cfg.img_size // cfg.patch_size) ** 2
    B = cfg.batch_size or 64
    results = []
    with tempfile.TemporaryDirectory() as root:
        write_jpegs(root, cfg.images)
        for path in ('cpu-pil', 'gpu'):
            gpu = path == 'gpu'
            crop = data.CropFlipParams(cfg.img_size) if gpu else data.mae_transform(cfg.img_size, normalize=False)
            ds = data.Seeded(data.build_dataset(root, encoded=gpu), data.WithNoise(crop, L))
            loader, sampler = data.make_loader(ds, B, num_workers=cfg.num_workers, pin_memory=cuda,
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
            r = {'path': path, 'img_per_s': round(cfg.steps * B / dt, 1), 'num_workers': cfg.num_workers,
                 'batch': B, 'img_size': cfg.img_size, 'images': cfg.images,
                 'device': torch.cuda.get_device_name(device) if cuda else 'cpu', 'cpus': os.cpu_count(),
                 'torch': torch.__version__, 'torchvision': torchvision.__version__}
            print(' '.join(f'{k}={v}' for k, v in r.items()), flush=True)
            results.append(r)
    return results


# -----------------------------------------------------------------------------
# --suite: the one-GPU check, and its CPU dry run at mini sizes

SUITE_PARTS = ('environment', 'cuda_tests', 'steps', 'loader', 'mae_run', 'compiled', 'large')
# sizes by device type; est: seconds each part is expected to take (a part starts only if it fits the budget left)
SUITE = {
    'cuda': dict(model='base', img_size=224, patch_size=16, batch_size=0, steps=10, warmup=3, backend='inductor',
                 large=('large', 256), images=512, loader_batch=256, workers=10, tests_timeout=150,
                 run_args=['--max_steps', '200', '--log_every', '50'],
                 est=dict(environment=5, cuda_tests=30, step=20, loader=30, mae_run=60, compiled=75, large=100)),
    'cpu': dict(model='mini', img_size=32, patch_size=8, batch_size=4, steps=2, warmup=1, backend='aot_eager',
                large=('tiny', 4), images=16, loader_batch=8, workers=1, tests_timeout=300,
                run_args=['--max_steps', '3', '--log_every', '1', '--model', 'mini', '--img_size', '32',
                          '--patch_size', '8', '--batch_size', '8', '--num_workers', '1'],
                est=dict(environment=1, cuda_tests=20, step=3, loader=5, mae_run=10, compiled=20, large=20)),
}


def free_memory():
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def suite_step(cfg, method, compiled):
    """One method's step at the suite's sizes; on a CUDA out-of-memory the batch is halved once."""
    c = dataclasses.replace(cfg, method=method, compile=compiled, compare=False, baseline=False, suite=False)
    try:
        return bench(c)
    except torch.OutOfMemoryError:
        free_memory()
        B = c.batch_size or (128 if method == 'finetune' else method_config(MODULES[method], c).batch_size)
        print(f'{method}: out of memory at batch {B}; retrying at {B // 2}', flush=True)
        return bench(dataclasses.replace(c, batch_size=max(1, B // 2)))


def run_cuda_tests(timeout):
    """`python -m pytest tests -m cuda -q` in a subprocess: (return code, summary line, seconds)."""
    root = os.path.dirname(os.path.abspath(__file__))
    t = time.time()
    try:
        p = subprocess.run([sys.executable, '-m', 'pytest', os.path.join(root, 'tests'), '-m', 'cuda', '-q',
                            '-p', 'no:cacheprovider'], cwd=root, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b'').decode(errors='replace') if isinstance(e.stdout, bytes) else (e.stdout or '')
        print(out[-3000:], flush=True)
        raise RuntimeError(f'pytest -m cuda did not finish in {timeout:.0f} s') from None
    print(p.stdout[-6000:] + p.stderr[-2000:], flush=True)
    lines = [ln for ln in p.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1].strip('= ') if lines else ''
    return p.returncode, summary, time.time() - t


def mae_run(run_args, device, out_dir):
    """mae.main on the embedded shapes (its whole loop: loader, train_step, log, checkpoint, picture); returns the
    row from its log.jsonl and whether the saved encoder holds CPU tensors only."""
    os.makedirs(out_dir, exist_ok=True)
    log = os.path.join(out_dir, 'log.jsonl')
    for f in ('log.jsonl', 'checkpoint.pt'):
        if os.path.exists(os.path.join(out_dir, f)):
            os.remove(os.path.join(out_dir, f))
    t = time.time()
    mae.main(run_args + ['--device', device, '--out_dir', out_dir])
    wall = time.time() - t
    recs = [json.loads(line) for line in open(log)]
    ckpt = torch.load(os.path.join(out_dir, 'checkpoint.pt'), weights_only=True)  # tensors where they were saved
    cfg = ckpt['config']
    return {'what': f"mae.py {' '.join(run_args)}", 'model': f"{cfg['model']}/{cfg['patch_size']}@{cfg['img_size']}",
            'batch': cfg['batch_size'], 'dtype': cfg['dtype'] or ('bf16' if device.startswith('cuda') else 'fp32'),
            'compile': cfg['compile'], 'steps': recs[-1]['step'], 'img_per_s': round(recs[-1]['img_per_s'], 1),
            'loss_first': round(recs[0]['loss'], 4), 'loss_last': round(recs[-1]['loss'], 4),
            'wall_s': round(wall, 1), 'encoder_on_cpu': all(v.device.type == 'cpu' for v in ckpt['encoder'].values()),
            'device': hardware(device), 'torch': torch.__version__, 'cuda': torch.version.cuda}


def environment(device):
    try:
        smi = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total,power.limit,'
                              'clocks.max.sm,pstate', '--format=csv,noheader'], capture_output=True, text=True,
                             timeout=30).stdout.strip() or 'no output'
    except (OSError, subprocess.TimeoutExpired) as e:
        smi = f'not available ({type(e).__name__})'
    env = {'nvidia_smi': smi, 'device': hardware(device), 'torch': torch.__version__, 'cuda': torch.version.cuda,
           'cudnn': torch.backends.cudnn.version(), 'torchvision': torchvision.__version__,
           'python': platform.python_version(), 'cpus': os.cpu_count(), 'host': platform.platform()}
    if device.startswith('cuda'):
        env['capability'] = '.'.join(map(str, torch.cuda.get_device_capability(device)))
        env['peak_bf16'], env['peak_tf32'] = peak(device, 'bf16')[1], peak(device, 'fp32')[1]
        env['tf32'] = torch.backends.cuda.matmul.allow_tf32
    return env


def cell(v, fmt='{}'):
    return '' if v is None else fmt.format(v)


def suite_markdown(report):
    env = report['environment']
    lines = [f"# `python bench.py --suite` on {env.get('device', '?')}", '',
             f"- nvidia-smi: {env.get('nvidia_smi', '?')}",
             f"- torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, torchvision "
             f"{env.get('torchvision')}, Python {env.get('python')}, {env.get('cpus')} CPUs",
             f"- MFU against: bf16 {env.get('peak_bf16', 'n/a')}; fp32 {env.get('peak_tf32', 'n/a')}"]
    if 'cuda_tests' in report:
        lines.append(f"- `pytest tests -m cuda`: {report['cuda_tests']}")
    lines += [f"- wall time {report['wall_s']:.0f} s (budget {report['budget_s']:.0f} s)", '',
              '| part | status | seconds |', '|---|---|---:|']
    lines += [f"| {p['part']} | {p['status']} | {p['seconds']:.0f} |" for p in report['parts']]
    lines += ['', '| what | model | batch | dtype | compile | img/s | ms/step | TFLOP/s | MFU | peak used (TFLOP/s) '
              '| peak mem (GiB) | notes | hardware |',
              '|---|---|---:|---|---|---:|---:|---:|---:|---|---:|---|---|']
    for r in report['rows']:
        hw = f"{r.get('device', '?')}, torch {r.get('torch')}, CUDA {r.get('cuda')}"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get('mfu') is not None else ''
        if 'finite' in r:  # a timed step: its last loss, and graphs compiled while timing (should be none)
            notes = f"loss {r['loss']}{'' if r['finite'] else ' NOT FINITE'}, {r['recompiles_timed']} recompiles"
        elif 'loss_first' in r:  # the mae.py run
            notes = (f"{r['steps']} steps, loss {r['loss_first']} -> {r['loss_last']}, {r['wall_s']} s; encoder "
                     f"saved as {'CPU' if r['encoder_on_cpu'] else 'device'} tensors")
        else:
            notes = ''
        lines.append(f"| {r['what']} | {r.get('model', '')} | {cell(r.get('batch'))} | {r.get('dtype', '')} | "
                     f"{cell(r.get('compile'))} | {cell(r.get('img_per_s'))} | {cell(r.get('ms_per_step'))} | "
                     f"{cell(r.get('tflop_per_s'))} | {mfu} | {cell(r.get('peak_tflops'))} | "
                     f"{cell(r.get('peak_mem_GiB'))} | {notes} | {hw} |")
    return '\n'.join(lines) + '\n'


def run_suite(cfg):
    """The parts in order, each guarded and timed, the report rewritten after each (a killed run keeps it)."""
    t_start = time.time()
    device = setup_device(cfg.device)
    S = SUITE['cuda' if device.startswith('cuda') else 'cpu']
    groups = cfg.parts.split(',') if cfg.parts else list(SUITE_PARTS)
    unknown = set(groups) - set(SUITE_PARTS)
    if unknown:
        raise SystemExit(f'error: --parts {",".join(sorted(unknown))}: choose from {",".join(SUITE_PARTS)}')
    os.makedirs(cfg.out_dir, exist_ok=True)
    base = dataclasses.replace(cfg, device=device, model=S['model'], img_size=S['img_size'],
                               patch_size=S['patch_size'], batch_size=S['batch_size'], steps=S['steps'],
                               warmup=S['warmup'], compile_backend=S['backend'], suite=False)
    report = {'environment': {}, 'parts': [], 'rows': [], 'budget_s': cfg.budget_s, 'wall_s': 0.0}

    def save():
        report['wall_s'] = round(time.time() - t_start, 1)
        with open(os.path.join(cfg.out_dir, 'suite.json'), 'w') as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(cfg.out_dir, 'suite.md'), 'w') as f:
            f.write(suite_markdown(report))

    def part(name, est, fn):
        """Run fn (-> table rows) if ~est seconds fit in the budget left; a failure is reported, not raised."""
        left = cfg.budget_s - (time.time() - t_start)
        if est > left:
            status = f'skipped: needs ~{est:.0f} s, {max(left, 0):.0f} s left'
            print(f'== {name}: {status}', flush=True)
            report['parts'].append({'part': name, 'status': status, 'seconds': 0.0})
            return save()
        print(f'== {name} ({left:.0f} s left)', flush=True)
        t = time.time()
        try:
            rows, status = fn(left) or [], 'ok'
        except (Exception, SystemExit) as e:  # a failed part (mae.main exits on errors) is reported; the next runs
            traceback.print_exc()
            rows, status = [], f'failed: {type(e).__name__}: {str(e).strip()[:300]}'
        free_memory()
        for r in rows:
            print(' '.join(f'{k}={v}' for k, v in r.items()), flush=True)
        report['rows'] += rows
        report['parts'].append({'part': name, 'status': status, 'seconds': round(time.time() - t, 1)})
        print(f'== {name}: {status} in {time.time() - t:.0f} s', flush=True)
        save()

    def env_part(left):
        report['environment'] = environment(device)
        for k, v in report['environment'].items():
            print(f'{k}: {v}', flush=True)

    def tests_part(left):
        rc, summary, secs = run_cuda_tests(min(S['tests_timeout'], left))
        report['cuda_tests'] = f'{summary or "no output"} (exit {rc}, {secs:.0f} s)'
        if rc not in (0, 5):  # 5: no test selected (no CUDA test file yet)
            raise RuntimeError(report['cuda_tests'])

    def step_part(method, compiled, model=None, B=None):
        c = dataclasses.replace(base, model=model or base.model, batch_size=B or base.batch_size)
        return lambda left: [{'what': f"{method} step{', ViT-' + model if model else ''}"
                                      f"{' (compiled)' if compiled else ''}", **suite_step(c, method, compiled)}]

    def loader_part(left):
        c = dataclasses.replace(base, batch_size=S['loader_batch'], num_workers=data.default_workers(S['workers']),
                                images=S['images'], steps=S['warmup'] + S['steps'] // 2)
        return [{'what': f"data path {r['path']} ({r['num_workers']} workers, {r['images']} JPEGs 500x375)",
                 'model': f"{r['img_size']} px crops", **{k: r[k] for k in ('batch', 'img_per_s', 'torch')},
                 'device': f"{hardware(device)}, {r['cpus']} CPUs", 'cuda': torch.version.cuda}
                for r in bench_loader(c)]

    est = S['est']
    todo = [('environment', 'environment', est['environment'], env_part),
            ('cuda_tests', 'CUDA tests (pytest -m cuda)', est['cuda_tests'], tests_part)]
    todo += [('steps', f'{m} step', est['step'], step_part(m, False)) for m in METHODS]
    todo += [('loader', 'data path', est['loader'], loader_part),
             ('mae_run', 'mae.py run', est['mae_run'],
              lambda left: [mae_run(S['run_args'], device, os.path.join(cfg.out_dir, 'mae_run'))]),
             ('compiled', 'mae step (compiled)', est['compiled'], step_part('mae', True)),
             ('large', f"mae step, ViT-{S['large'][0]} (compiled)", est['large'], step_part('mae', True, *S['large']))]
    todo += [('compiled', f'{m} step (compiled)', est['compiled'], step_part(m, True)) for m in METHODS[1:]]
    for group, name, seconds, fn in todo:
        if group in groups:
            part(name, seconds, fn)
    save()
    print(f"== suite done in {report['wall_s']:.0f} s: {cfg.out_dir}/suite.md, suite.json", flush=True)
    print(suite_markdown(report), flush=True)
    return report


def get_config(argv=None):
    """argparse from Config: each flag's help is its field's comment (mae.field_help reads them)."""
    helps = mae.field_help(Config)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        kind = dict(type=lambda s: s.lower() in ('1', 'true', 'yes', 'on'), nargs='?', const=True, metavar='BOOL') \
            if f.type is bool else dict(type=f.type)  # a bare --suite means --suite true
        p.add_argument(f'--{f.name}', default=f.default, help=f'{helps.get(f.name, "")} (default {f.default!r})'
                       .replace('%', '%%'), **kind)
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.method not in STEPS:
        p.error(f'--method must be one of {", ".join(STEPS)}')
    return cfg


def main(argv=None):
    cfg = get_config(argv)
    if cfg.suite:
        return run_suite(cfg)
    if cfg.loader:
        return bench_loader(cfg)
    runs = [cfg]
    if cfg.compare:
        runs = [dataclasses.replace(cfg, dtype='fp32', compile=False, baseline=True),
                dataclasses.replace(cfg, dtype='fp32', compile=False),
                dataclasses.replace(cfg, dtype='bf16', compile=False),
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
