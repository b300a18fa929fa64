"""The CUDA paths, on a GPU: `python -m pytest tests -m cuda` (every test here is marked `cuda` and skipped, with the
reason, where torch.cuda.is_available() is False; the two-process test also needs 2 GPUs).

For each of MAE, LUT, iBOT, DTM and fine-tuning, the training step main() runs (mae/lut/ibot/dtm/finetune.train_step;
fine-tuning with mixup / cutmix, label smoothing, layer-decay groups and the weights' EMA), on the 1-block 'pico' ViT
at 16 px of tests/test_precision.py, whose device-generic checks run here on 'cuda':
  - bf16 autocast: finite, loss within 2 % of the fp32 step on the same batch and weights; fp16 + GradScaler
    likewise (0.5 %), and an overflowing fp16 step is skipped (parameters and optimizer untouched, scale halved);
  - fused AdamW (main()'s optimizer on CUDA) equals multi-tensor AdamW after 3 steps;
  - torch.compile (inductor, Triton kernels) in bf16, main()'s GPU default, close to eager bf16; MAE in fp32 equal
    to eager to round-off.
Then mae.py end to end: `--decode gpu` (nvJPEG decode + crop on the device) gives the crops of the CPU path on the
same JPEGs; a checkpoint written on CUDA resumes on the CPU and the reverse, its `encoder` all CPU tensors; and a
2-process NCCL run equals one process for every method.
Where cheap, a test also runs with device 'cpu' in the default suite (unmarked), so its logic is tried without a GPU.
fp32 comparisons run with TF32 off (main() turns it on; here it would blur the fp32 references)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import mae
import vit
from conftest import load_ckpt, run_torchrun
from test_precision import (ARGS, BF16_LOSS_RTOL, COMMON, FP16_LOSS_RTOL, METHODS, MODULES, PICO, STEP_METHODS, Case,
                            key_bias, check_autocast_close_to_fp32, check_compiled_equals_eager,
                            check_fp16_scaler_skips_overflow, check_fused_equals_foreach, precision)

HAS_CUDA = torch.cuda.is_available()
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason='needs a CUDA device (torch.cuda.is_available() '
                                                                      'is False)')]
pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')  # e.g. TF32 / nvJPEG notices
ON_CUDA = pytest.param('cuda', marks=CUDA, id='cuda')
ON_CPU = pytest.param('cpu', id='cpu')


@pytest.fixture(autouse=True)
def pico_vit(monkeypatch):
    monkeypatch.setitem(vit.SIZES, 'pico', PICO)


@pytest.fixture(autouse=True)
def ieee_fp32():
    """fp32 matmuls and convolutions in IEEE fp32 during the test (main() and setup_distributed turn TF32 on for the
    whole process); the switches are put back afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------- one step of each method


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason='needs a CUDA device (torch.cuda.is_available() is False)')
@pytest.mark.parametrize('method', STEP_METHODS)
class TestStepOnCuda:
    def test_bf16_step_close_to_fp32(self, method):
        check_autocast_close_to_fp32(method, 'cuda', 'bf16', BF16_LOSS_RTOL)

    def test_fp16_step_close_to_fp32(self, method):
        check_autocast_close_to_fp32(method, 'cuda', 'fp16', FP16_LOSS_RTOL)

    def test_fp16_grad_scaler_skips_an_overflowing_step(self, method):
        check_fp16_scaler_skips_overflow(method, 'cuda')

    def test_fused_adamw_equals_foreach(self, method):
        check_fused_equals_foreach(method, 'cuda')

    def test_compiled_bf16_step_close_to_eager_bf16(self, method):
        """main()'s default on a GPU: bf16 autocast + compile (inductor, Triton kernels). Inductor keeps the
        intermediates of a fused kernel in fp32 where eager rounds each op's output to bf16, so the two agree to
        bf16 precision, not bit for bit."""
        torch._dynamo.reset()
        eager, comp = Case(method, 'cuda'), Case(method, 'cuda')
        ac, sc = precision(eager, 'bf16')
        fwd = comp.compiled()
        opt_e, opt_c = eager.optimizer(fused=True), comp.optimizer(fused=True)
        for _ in range(2):
            se, scomp = eager.step(opt_e, sc, ac), comp.step(opt_c, sc, ac, fwd)
            assert torch.isfinite(scomp).all(), scomp
            assert abs(se[0].item() - scomp[0].item()) <= BF16_LOSS_RTOL * abs(se[0].item()), (se, scomp)
        torch._dynamo.reset()


@pytest.mark.parametrize('device', [ON_CUDA])
def test_compiled_fp32_step_equals_eager(device):
    """MAE in fp32: the Triton kernels inductor writes for the step equal eager to fp32 round-off (the CPU suite
    checks all five steps this way with inductor's C++ kernels; one method here keeps the GPU compile time down)."""
    check_compiled_equals_eager('mae', device)


# ----------------------------------------------------------------------------- --decode gpu


def write_jpegs(root, n=8):
    """n smooth random-colour JPEGs of different sizes in two class folders; half 4:4:4, half 4:2:0 chroma
    subsampling (the common camera / ImageNet layout), quality 90."""
    rng = np.random.default_rng(0)
    for k in range(n):
        (root / f'c{k % 2}').mkdir(parents=True, exist_ok=True)
        grid = (rng.random((5, 6, 3)) * 255).astype(np.uint8)
        size = (48 + 8 * k, 40 + 4 * k)  # (W, H)
        Image.fromarray(grid).resize(size, Image.BICUBIC).save(root / f'c{k % 2}' / f'{k}.jpg', quality=90,
                                                                subsampling=0 if k % 2 else 2)


# --decode gpu vs PIL, in [0, 1] pixel units: nvJPEG's IDCT and chroma upsampling may differ from libjpeg-turbo's by a
# few grey levels on smooth images; the crop / resize / flip are the same operations on both paths. For scale, on the
# CPU (libjpeg-turbo on both sides) the two paths agree exactly, and a crop box one pixel off gives mean 6.6 / max 44
# levels on these images. Not yet measured on a GPU.
DECODE_MAX = 12 / 255
DECODE_MEAN = 1.5 / 255


@pytest.mark.parametrize('device', [ON_CUDA, ON_CPU])
def test_gpu_decode_gives_the_cpu_crops(device, tmp_path):
    """The same (seed, epoch, index) keys through both loaders' datasets: mae_transform on PIL images, and
    CropFlipParams + data.gpu_decode_batch (called as mae.main calls it) on the JPEG bytes."""
    write_jpegs(tmp_path)
    S, L = 32, 16
    cpu = data.Seeded(data.ImageFolder(str(tmp_path)), data.WithNoise(data.mae_transform(S), L))
    enc = data.Seeded(data.EncodedFolder(str(tmp_path)), data.WithNoise(data.CropFlipParams(S), L))
    keys = [(i, 7 * i + s) for s in range(3) for i in range(8)]  # 24 crops, boxes and flips from each key's seed
    (imgs, noise), labels = data.collate_encoded([enc[k] for k in keys])
    out = data.gpu_decode_batch(*imgs, S, device)  # uint8, normalised on the device as mae.main does
    assert out.device.type == device and out.shape == (24, 3, S, S) and out.dtype == torch.uint8
    out = data.to_device(out, device)
    ref_imgs, ref_noise = map(torch.stack, zip(*[cpu[k][0] for k in keys]))
    assert torch.equal(noise, ref_noise)  # the same masking noise too
    diff = (data.denormalize(out.cpu()) - data.denormalize(ref_imgs)).abs()
    assert diff.max() <= DECODE_MAX and diff.mean() <= DECODE_MEAN, (diff.max().item() * 255, diff.mean().item() * 255)


# ----------------------------------------------------------------------------- checkpoints across devices


MAE_RUN = COMMON + ARGS['mae'] + ['--batch_size', '4', '--lr', '1e-3', '--warmup_epochs', '0', '--log_every', '1']


@pytest.mark.parametrize('first,second', [pytest.param('cuda', 'cpu', marks=CUDA, id='cuda-to-cpu'),
                                          pytest.param('cpu', 'cuda', marks=CUDA, id='cpu-to-cuda'),
                                          pytest.param('cpu', 'cpu', id='cpu-to-cpu')])
def test_checkpoint_resumes_on_the_other_device(first, second, tmp_path):
    """mae.main: 2 steps on `first` (default dtype: bf16 on CUDA, fp32 on the CPU), then resumed on `second` to step
    4. The checkpoint's `encoder` loads as CPU tensors with no map_location; the optimizer moments move along."""
    out = str(tmp_path / 'run')
    mae.main(MAE_RUN + ['--device', first, '--max_steps', '2', '--out_dir', out])
    ck = torch.load(os.path.join(out, 'checkpoint.pt'), weights_only=True)  # where each tensor was saved
    assert ck['encoder'] and all(v.device.type == 'cpu' for v in ck['encoder'].values())
    assert all(v.device.type == first for v in ck['model'].values())
    mae.main(MAE_RUN + ['--device', second, '--max_steps', '4', '--resume', 'auto', '--out_dir', out])
    ck2 = load_ckpt(out)
    assert ck2['step'] == 4 and ck2['config']['device'] == second
    log = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    assert [r['step'] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r['loss']) for r in log)
    moved = [k for k in ck['model'] if not torch.equal(ck['model'][k].cpu(), ck2['model'][k])]
    assert moved  # the resumed run trained on from the loaded weights
    assert ck2['optimizer']['state'][0]['step'] == 4  # the moments came along: AdamW counts from the first run


# ----------------------------------------------------------------------------- NCCL


NCCL_EXTRA = {'mae': [], 'lut': [], 'ibot': ['--drop_path', '0'], 'dtm': ['--morph_n', '0', '--drop_path', '0']}


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs 2 CUDA devices')
@pytest.mark.parametrize('method', METHODS)
def test_two_process_nccl_equals_one_process(method, tmp_path):
    """torchrun 2 processes x batch 4 on 2 GPUs (NCCL: DDP gradients, LUT's global-batch BN, iBOT's centers, the
    teachers' broadcast, the loss average) = 1 process x batch 8 on one GPU, fp32 (TF32 in both, as main() sets)."""
    script = tmp_path / f'{method}_pico.py'
    script.write_text(f'import vit\nvit.SIZES["pico"] = {PICO}\nimport {method}\n{method}.main()\n')
    common = COMMON + ARGS[method] + NCCL_EXTRA[method] + ['--max_steps', '2', '--lr', '1e-3', '--warmup_epochs',
                                                            '0', '--log_every', '1', '--dtype', 'fp32',
                                                            '--device', 'cuda']
    run_torchrun(str(script), common + ['--batch_size', '4', '--out_dir', str(tmp_path / 'ddp')])
    MODULES[method].main(common + ['--batch_size', '8', '--out_dir', str(tmp_path / 'single')])
    logs = [[json.loads(line) for line in open(tmp_path / d / 'log.jsonl')] for d in ('single', 'ddp')]
    assert len(logs[0]) == len(logs[1]) == 2
    for a, b in zip(*logs):
        assert abs(a['loss'] - b['loss']) <= 1e-4 * abs(a['loss']), (a, b)
    single, ddp = load_ckpt(str(tmp_path / 'single')), load_ckpt(str(tmp_path / 'ddp'))
    for part in ('model', 'teacher', 'centers'):
        if part not in single:
            continue
        far = total = 0
        for k, a in single[part].items():
            x, y = key_bias(k, a.float()), key_bias(k, ddp[part][k].float())
            far += int(((x - y).abs() > 1e-4).sum())  # lr 1e-3: Adam moves an element by ~1e-3 a step
            total += x.numel()
        assert far <= 1e-3 * total, (part, far, total)
