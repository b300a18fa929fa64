"""
bench.py -- time the real training step of a method on synthetic batches already on the device.

Prints, beside every figure, the device name, torch / CUDA versions, dtype, compile flag and batch size:
ms/step, img/s, achieved TFLOP/s from a structural FLOP count and, on a GPU, model FLOPs utilisation (MFU)
against the dense bf16 (or fp32) peak of the device.

  python bench.py                                    # MAE, embedded-size model, CPU or GPU
  python bench.py --method mae --model base --img_size 224 --patch_size 16 --batch_size 256 --compile true
  python bench.py --compare true                     # eager fp32 vs bf16 vs compile, with ratios

FLOP convention (nanoGPT / PaLM): one multiply-add = 2 FLOPs, matmuls only; a block on T tokens of width d costs
24*d^2*T + 4*T^2*d; a trained network costs 3x its forward (forward + backward), a frozen/EMA one 1x.
"""
import argparse
import dataclasses
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

import mae
import vit

# dense peak TFLOP/s by device-name fragment: (bf16/fp16, tf32/fp32); spec sheets, SXM parts
PEAKS = {'H200': (989.4, 494.7), 'H100': (989.4, 494.7), 'A100': (312.0, 156.0), 'L40S': (362.1, 181.0),
         'A10': (125.0, 62.5), 'V100': (125.0, 15.7), '4090': (165.2, 82.6), '3090': (71.0, 35.6)}


@dataclass
class Config:
    method: str = 'mae'        # mae|finetune (the step that is timed)
    model: str = 'tiny'        # ViT size
    img_size: int = 64         # input resolution
    patch_size: int = 8        # patch size
    batch_size: int = 64       # images per step
    dtype: str = ''            # bf16|fp16|fp32; '' = bf16 on CUDA, fp32 on CPU
    compile: bool = False      # torch.compile the model
    steps: int = 10            # timed steps
    warmup: int = 3            # untimed steps first (compilation, allocator, cudnn autotune)
    decoder_dim: int = 0       # MAE decoder; 0 = 512 (x8 blocks, 16 heads) at >= 224 px, else 128 x 2 x 4
    baseline: bool = False     # straightforward step: eager, single-tensor AdamW (no foreach / fused kernels)
    compare: bool = False      # run the baseline, then eager fp32, eager bf16 and compiled bf16, and print ratios
    device: str = ''           # cuda|cpu; '' = cuda if available


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


# -----------------------------------------------------------------------------
# the timed steps


def adamw(params, cfg, device, **kw):
    """The scripts' optimizer: fused AdamW on CUDA, multi-tensor (foreach) on CPU; the baseline uses neither."""
    cuda = device.startswith('cuda')
    if cfg.baseline:
        return torch.optim.AdamW(params, lr=1e-4, foreach=False, fused=False, **kw)
    return torch.optim.AdamW(params, lr=1e-4, fused=cuda, foreach=not cuda, **kw)


def make_mae_step(cfg, device, autocast):
    big = cfg.img_size >= 224
    dd = cfg.decoder_dim or (512 if big else 128)
    depth, heads = (8, 16) if big else (2, 4)
    mcfg = mae.get_config(['--model', cfg.model, '--img_size', str(cfg.img_size), '--patch_size', str(cfg.patch_size),
                           '--decoder_dim', str(dd), '--decoder_depth', str(depth), '--decoder_heads', str(heads)])
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


STEPS = {'mae': make_mae_step, 'finetune': make_finetune_step}


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
