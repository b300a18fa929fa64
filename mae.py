"""
mae.py -- MAE pre-training (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners"), one file.

Mask 75% of the patches at random per image, encode only the visible 25% with a ViT, reconstruct the pixels
of the masked patches with a light decoder that sees mask tokens; the loss is the MSE on masked patches only.

  python mae.py                                               # embedded data, CPU, minutes
  torchrun --nproc_per_node=8 mae.py --data /path/to/imagenet # paper recipe: ViT-B/16, 800 ep, eff. batch 4096
  torchrun ... mae.py --data /path/to/imagenet --decode gpu   # workers read JPEG bytes; decode + crop on the GPU
  python mae.py --help                                        # every knob, with its default

Letters in shape comments: B batch, L patches, K kept patches, D encoder width, Dd decoder width,
P pixels per patch (p*p*3).
"""
import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import vit

METHOD = 'mae'

# -----------------------------------------------------------------------------
# config: typed defaults, one comment each; 0 / '' = pick by data (embedded CPU default or the paper recipe)


@dataclass
class Config:
    data: str = ''             # image folder (ImageNet layout: DIR/train/<class>/*.jpg) or '' for the embedded shapes
    model: str = ''            # mini|tiny|small|base|large|huge; '' = tiny on embedded data, base on a folder
    img_size: int = 0          # input resolution; 0 = 64 embedded, 224 folder
    patch_size: int = 0        # 0 = 8 embedded, the model's own (16, 14 for huge) on a folder
    mask_ratio: float = 0.75   # fraction of patches removed per image
    norm_pix_loss: bool = True  # per-patch normalised pixel target (the recipe of every published model)
    decoder_dim: int = 0       # 0 = 128 embedded, 512 folder
    decoder_depth: int = 0     # 0 = 2 embedded, 8 folder
    decoder_heads: int = 0     # 0 = 4 embedded, 16 folder
    epochs: int = 0            # 0 = 8 embedded, 800 folder
    batch_size: int = 0        # per process; 0 = 64 embedded, 512 folder (4096 on 8 GPUs)
    accum_iter: int = 1        # gradient accumulation steps (effective batch = batch_size * accum_iter * world)
    blr: float = 0.0           # base lr, lr = blr * effective_batch / 256; 0 = 1.5e-4 folder (recipe), 1.5e-3 embedded
    lr: float = 0.0            # absolute lr; overrides blr when > 0
    min_lr: float = 0.0        # end of the cosine schedule
    warmup_epochs: float = -1  # linear warm-up; -1 = 1 embedded, 40 folder
    weight_decay: float = 0.05  # AdamW; none on biases, norms, tokens, position embeddings
    out_dir: str = 'out/mae'   # checkpoint.pt, log.jsonl, recon.png
    resume: str = ''           # '' fresh, 'auto' = out_dir/checkpoint.pt if present, or a path
    save_every: int = 500      # steps between checkpoints (always saved at the end)
    dtype: str = ''            # bf16|fp16|fp32; '' = bf16 on CUDA, fp32 on CPU
    compile: bool = False      # torch.compile the model
    seed: int = 0              # data order, augmentation and masks are pure functions of (seed, epoch, index)
    num_workers: int = -1      # loader workers per process; -1 = 2 embedded, 10 folder
    decode: str = 'cpu'        # cpu: PIL decode + crop in the workers; gpu: workers send JPEG bytes, the device decodes
    log_every: int = 20        # steps between log lines (the only host syncs)
    max_steps: int = 0         # stop after this many optimizer steps (0 = run all epochs); schedule unchanged
    device: str = ''           # cuda|cpu|cuda:N; '' = cuda if available


EMBEDDED = dict(model='tiny', img_size=64, patch_size=8, decoder_dim=128, decoder_depth=2, decoder_heads=4,
                epochs=8, batch_size=64, blr=1.5e-3, warmup_epochs=1, num_workers=2)
RECIPE = dict(model='base', img_size=224, patch_size=0, decoder_dim=512, decoder_depth=8, decoder_heads=16,
              epochs=800, batch_size=512, blr=1.5e-4, warmup_epochs=40, num_workers=10)
ARCH_KEYS = ('model', 'img_size', 'patch_size', 'decoder_dim', 'decoder_depth', 'decoder_heads')  # must match on resume


def get_config(argv=None):
    """argparse from the dataclass (unknown flags rejected), then fill the data-dependent defaults."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.type is bool:
            p.add_argument(f'--{f.name}', type=lambda s: s.lower() in ('1', 'true', 'yes', 'on'), default=f.default,
                           metavar='BOOL', help=f'(default {f.default})')
        else:
            p.add_argument(f'--{f.name}', type=f.type, default=f.default, help=f'(default {f.default!r})')
    cfg = Config(**vars(p.parse_args(argv)))
    for k, v in (EMBEDDED if cfg.data in ('', 'shapes') else RECIPE).items():
        if getattr(cfg, k) == Config.__dataclass_fields__[k].default:  # left at its 'pick by data' default
            setattr(cfg, k, v)
    if cfg.patch_size == 0:
        cfg.patch_size = vit.SIZES[cfg.model][3] if cfg.model in vit.SIZES else 16
    if cfg.model not in vit.SIZES:
        p.error(f'--model must be one of {", ".join(vit.SIZES)}')
    if cfg.img_size % cfg.patch_size:
        p.error(f'--img_size {cfg.img_size} is not divisible by --patch_size {cfg.patch_size}')
    if not 0.0 < cfg.mask_ratio < 1.0:
        p.error(f'--mask_ratio must be in (0, 1), got {cfg.mask_ratio}')
    if cfg.dtype not in ('', 'bf16', 'fp16', 'fp32'):
        p.error('--dtype must be bf16, fp16 or fp32')
    if cfg.decode not in ('cpu', 'gpu') or (cfg.decode == 'gpu' and not data.is_folder(cfg.data)):
        p.error('--decode must be cpu, or gpu with --data an image folder (it decodes JPEG files)')
    return cfg

# -----------------------------------------------------------------------------
# model: ViT encoder on the kept patches + light decoder with mask tokens (paper sec. 3)


class MAE(nn.Module):
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
        # MAE init (models_mae.py): xavier_uniform Linear, zero bias, LN (1, 0), tokens N(0, 0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
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

    def forward(self, imgs, noise, mask_ratio, norm_pix):
        """imgs (B, 3, H, W), noise (B, L) -> (loss, pred (B, L, P), mask (B, L) with 1 = removed)."""
        ids_shuffle, ids_restore, K = data.random_masking(noise, mask_ratio)
        ids_keep = ids_shuffle[:, :K]  # (B, K)
        mask = data.mask_from_ids(ids_keep, noise.shape[1])  # (B, L)
        pred = self.forward_decoder(self.forward_encoder(imgs, ids_keep), ids_restore)
        target = pixel_target(imgs, self.patch_size, norm_pix)
        return mae_loss(pred, target, mask), pred, mask

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

# -----------------------------------------------------------------------------
# optimizer and schedules


def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases, norms (1-D params), tokens and position embeddings."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or n.endswith(('cls_token', 'mask_token', 'pos_embed'))
        (no_decay if skip else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


def lr_at(step, base_lr, min_lr, warmup_steps, total_steps):
    """Per-step linear warm-up from 0, then half-cycle cosine to min_lr (MAE util/lr_sched.py)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

# -----------------------------------------------------------------------------
# checkpointing


def rng_state():
    return {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


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


def load_checkpoint(path, cfg):
    """Load a checkpoint to resume from; refuses another method's or another architecture's checkpoint."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        sys.exit(f'error: cannot read checkpoint {path} ({type(e).__name__}: {e})')
    if ckpt.get('method') != METHOD:
        sys.exit(f'error: {path} is a {ckpt.get("method", "non-nanoMIM")} checkpoint, not {METHOD}')
    old = ckpt['config']
    diff = [f'{k}={old.get(k)} (now {getattr(cfg, k)})' for k in ARCH_KEYS if old.get(k) != getattr(cfg, k)]
    if diff:
        sys.exit(f'error: {path} was trained with ' + ', '.join(diff))
    return ckpt


@torch.no_grad()
def save_reconstructions(model, imgs, noise, cfg, path):
    """PNG rows: original | masked | reconstruction | reconstruction with the visible patches pasted.
    Under norm_pix_loss each predicted patch is un-normalised with the true patch's mean and std."""
    import torchvision
    model.eval()
    _, pred, mask = model(imgs, noise, cfg.mask_ratio, cfg.norm_pix_loss)
    p = cfg.patch_size
    target = vit.patchify(imgs, p)  # (B, L, P)
    if cfg.norm_pix_loss:
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    m = mask[..., None]  # (B, L, 1)
    rows = [target, target * (1 - m), pred, target * (1 - m) + pred * m]
    rows = [data.denormalize(vit.unpatchify(r.float(), p)) for r in rows]
    grid = torch.stack(rows, dim=1).flatten(0, 1)  # (4B, 3, H, W): one image per row
    torchvision.utils.save_image(grid, path, nrow=4, padding=1)
    model.train()

# -----------------------------------------------------------------------------
# training


def main(argv=None):
    cfg = get_config(argv)

    # distributed: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; plain `python` runs one process
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, local_rank, world = (int(os.environ['RANK']), int(os.environ['LOCAL_RANK']),
                               int(os.environ['WORLD_SIZE'])) if ddp else (0, 0, 1)
    device = cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}' if ddp else device
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    master = rank == 0
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    torch.manual_seed(cfg.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # precision: bf16 autocast by default on CUDA, fp16 with a GradScaler, fp32 on CPU
    dtype = cfg.dtype or ('bf16' if device_type == 'cuda' else 'fp32')
    ptdtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}[dtype]
    autocast = nullcontext() if dtype == 'fp32' else torch.autocast(device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'fp16')

    # data
    gpu_decode = cfg.decode == 'gpu'  # the loader yields (packed JPEG bytes, crop boxes, flips) in place of images
    try:
        base = data.build_dataset(cfg.data, 'train', cfg.img_size, encoded=gpu_decode)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'error: {e}')
    num_patches = (cfg.img_size // cfg.patch_size) ** 2
    crop = data.CropFlipParams(cfg.img_size) if gpu_decode else data.mae_transform(cfg.img_size, normalize=False)
    dataset = data.Seeded(base, data.WithNoise(crop, num_patches))
    try:
        loader, sampler = data.make_loader(dataset, cfg.batch_size, world, rank, cfg.seed, cfg.num_workers,
                                           collate_fn=data.collate_encoded if gpu_decode else None)
    except ValueError as e:
        sys.exit(f'error: {e}')
    steps_per_epoch = sampler.batches_per_epoch() // cfg.accum_iter
    total_steps = cfg.epochs * steps_per_epoch
    end_step = min(total_steps, cfg.max_steps) if cfg.max_steps > 0 else total_steps
    eff_batch = cfg.batch_size * cfg.accum_iter * world
    base_lr = cfg.lr if cfg.lr > 0 else cfg.blr * eff_batch / 256
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)

    # model, optimizer
    model = MAE(cfg).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=base_lr, betas=(0.9, 0.95),
                                  fused=device_type == 'cuda', foreach=device_type != 'cuda')
    step = 0
    resume = os.path.join(cfg.out_dir, 'checkpoint.pt') if cfg.resume == 'auto' else cfg.resume
    if resume and not (cfg.resume == 'auto' and not os.path.exists(resume)):
        ckpt = load_checkpoint(resume, cfg)
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        step = ckpt['step']
        if master:
            print(f'resumed from {resume} at step {step}')
        del ckpt
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        print(json.dumps({'method': METHOD, **dataclasses.asdict(cfg), 'world': world, 'device': device,
                          'dtype': dtype, 'effective_batch': eff_batch, 'lr': base_lr, 'steps': total_steps}))
        print(f'encoder {vit.count_params(model.encoder) / 1e6:.2f}M params, total {vit.count_params(model) / 1e6:.2f}M, '
              f'{len(base)} images, {steps_per_epoch} steps/epoch')
    fwd = torch.compile(model) if cfg.compile else model
    if ddp:
        fwd = DDP(fwd, device_ids=[local_rank] if device_type == 'cuda' else None)

    # a fixed batch for the reconstruction picture
    vis_imgs = torch.stack([data.eval_transform(cfg.img_size)(data.build_dataset(cfg.data, 'val', cfg.img_size)[i][0])
                            for i in range(8)]).to(device) if master else None
    vis_noise = torch.rand(8, num_patches, generator=torch.Generator().manual_seed(0)).to(device) if master else None

    def checkpoint():
        state = {'method': METHOD, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                 'scaler': scaler.state_dict(), 'step': step, 'epoch': step / max(1, steps_per_epoch),
                 'config': dataclasses.asdict(cfg), 'rng': rng_state(),
                 'encoder': vit.backbone_state_dict(model.encoder)}
        save_checkpoint(os.path.join(cfg.out_dir, 'checkpoint.pt'), state)
        save_reconstructions(model, vis_imgs, vis_noise, cfg, os.path.join(cfg.out_dir, 'recon.png'))

    # the loop: one optimizer step = accum_iter micro-batches
    model.train()
    stream = data.batches(loader, sampler, step * cfg.accum_iter)
    loss_sum = torch.zeros((), device=device)  # summed on the device, read only on log steps
    bad = torch.zeros((), device=device)  # any non-finite loss since the last check
    t0, t_start, step_start = time.time(), time.time(), step
    while step < end_step:
        torch.manual_seed(cfg.seed + 1_000_003 * rank + 7919 * step)  # in-step randomness: a function of (seed, rank, step)
        lr = lr_at(step, base_lr, cfg.min_lr, warmup_steps, total_steps)
        for g in optimizer.param_groups:
            g['lr'] = lr
        for micro in range(cfg.accum_iter):
            _, ((imgs, noise), _) = next(stream)
            if gpu_decode:  # imgs = (packed JPEG bytes, boxes (B, 4), flips (B,)) -> uint8 (B, 3, H, W) on the device
                imgs = data.gpu_decode_batch(*imgs, cfg.img_size, device)
            imgs, noise = data.to_device(imgs, device), noise.to(device, non_blocking=True)  # uint8 -> normalised
            sync = nullcontext() if (not ddp or micro == cfg.accum_iter - 1) else fwd.no_sync()
            with sync:
                with autocast:
                    loss, _, _ = fwd(imgs, noise, cfg.mask_ratio, cfg.norm_pix_loss)
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
                      f"gnorm {rec['grad_norm']:.3f} {ips:.0f} img/s eta {eta / 60:.1f} min", flush=True)
                with open(os.path.join(cfg.out_dir, 'log.jsonl'), 'a') as f:
                    f.write(json.dumps(rec) + '\n')
            loss_sum.zero_()
            t0, step_start = time.time(), step
        if save_now and master:
            checkpoint()
    if master:
        print(f'done: {step} steps in {(time.time() - t_start) / 60:.1f} min; checkpoint in {cfg.out_dir}')
    if ddp:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
