"""Precision and compilation paths of every method's training step, on the CPU (the default suite): the step each
script's main() runs (mae/lut/ibot/dtm/finetune.train_step), on a 1-block ViT at 16 px, against the same step in fp32
eager (fine-tuning with mixup / cutmix, label smoothing, layer-decay groups and the weights' EMA):
  - torch.compile (inductor) of the model, wrapped as main() wraps it, equals eager over 2 steps (fp32);
  - main() --compile true trains to the checkpoint of --compile false (dynamo's 'eager' backend: the wiring only);
  - bf16 and fp16 autocast: finite, loss close to fp32's;
  - fp16 + GradScaler skips a step whose gradients overflow (parameters and optimizer untouched, scale halved);
  - fused AdamW (what main() uses on CUDA) equals multi-tensor AdamW (what it uses on the CPU).
The checks are device-generic functions: tests/test_cuda.py runs the same ones on a GPU.
Also here, CPU-side tests of issue 20's GPU crashes: `--device cuda` gets an index without touching CUDA (in the
method files and in finetune.py / eval_seg.py), a checkpoint's `encoder` is CPU tensors,
resuming with another --dtype (restore() skips an empty GradScaler state)."""
import copy
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

import dtm
import finetune
import ibot
import lut
import mae
import vit
from conftest import load_ckpt

METHODS = ('mae', 'lut', 'ibot', 'dtm')  # the pre-training scripts
STEP_METHODS = METHODS + ('finetune',)  # the step checks also run finetune.py's train_step (--mode finetune)
MODULES = {'mae': mae, 'lut': lut, 'ibot': ibot, 'dtm': dtm, 'finetune': finetune}
PICO = (32, 1, 2, 4)  # width 32, 1 block, 2 heads, patch 4: 16 patches at 16 px. With 1 block the drop path rate
#                      (linear in depth from 0) is 0, so no random op differs between eager and inductor kernels
COMMON = ['--model', 'pico', '--img_size', '16', '--patch_size', '4', '--num_workers', '0']
ARGS = {  # each script's own get_config at the pico size; EMA momenta of 0.5 so that a teacher update is visible
    'mae': ['--decoder_dim', '32', '--decoder_depth', '1', '--decoder_heads', '2'],
    'lut': ['--decoder_dim', '32', '--decoder_depth', '1', '--decoder_heads', '2', '--head_dim', '64',
            '--ema_momentum', '0.5'],
    'ibot': ['--local_size', '8', '--local_crops_number', '2', '--out_dim', '64', '--head_hidden', '64',
             '--ema_momentum', '0.5', '--freeze_last_layer', '0'],
    'dtm': ['--ema_momentum', '0.5'],
    # the MAE recipe's mixing and smoothing, stated so that no regime default can turn them off; a weights' EMA
    'finetune': ['--checkpoint', 'none', '--mode', 'finetune', '--mixup', '0.8', '--cutmix', '1.0', '--smoothing',
                 '0.1', '--layer_decay', '0.65', '--ema', '0.5'],
}
BETAS = {'mae': (0.9, 0.95), 'lut': (0.9, 0.95), 'ibot': (0.9, 0.999), 'dtm': (0.9, 0.999),
         'finetune': (0.9, 0.999)}  # as in each main()
NUM_CLASSES = 10  # fine-tuning's classifier
LR = 1e-3
# Tolerances (the pico model at 16 px, batch 4):
COMPILE_LOSS_RTOL = 1e-4  # compiled vs eager fp32: the same arithmetic, reassociated by the compiler
STATE_ATOL = 2e-5  # parameters / teacher / centers after steps at lr 1e-3: Adam moves each element by ~lr per step
BF16_LOSS_RTOL = 0.02  # bf16 (8-bit mantissa) vs fp32 loss: measured <= 0.03 % on this CPU, all four methods;
#                        fine-tuning 0.07 %
FP16_LOSS_RTOL = 0.005  # fp16 (11-bit mantissa) vs fp32 loss: measured <= 0.01 % on this CPU (fine-tuning 2e-5 %)
FP16_SCALE = 2.0 ** 8  # GradScaler scale for the fp16 comparison: iBOT's fp16 gradients at this tiny batch overflow
#                        at 2^12 (GradScaler would skip and back off, tested on its own)


@pytest.fixture(autouse=True)
def pico_vit(monkeypatch):
    """A 1-block, 32-wide ViT ('pico', added to vit.SIZES for the test only): what these tests check (the
    precision / compile / optimizer plumbing of the step) does not depend on depth or width."""
    monkeypatch.setitem(vit.SIZES, 'pico', PICO)


class Case:
    """One method's training step as main() runs it, on `device`: the model, its teacher (lut / ibot / dtm; the
    weights' EMA for finetune) and centers (ibot), one step's batches and schedules. Built on the CPU from `seed` and
    then moved, so two cases with the same seed hold the same weights and batches on any device."""

    def __init__(self, method, device='cpu', seed=0, batch=4, extra=()):
        self.method, self.mod, self.device = method, MODULES[method], device
        self.cfg = cfg = self.mod.get_config(COMMON + ARGS[method] + list(extra))
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed + 1)
        S, L = cfg.img_size, (cfg.img_size // cfg.patch_size) ** 2
        self.teacher = self.centers = self.mixer = None
        if method == 'mae':
            self.model = mae.MAE(cfg).to(device)
            batches = [(torch.randn(batch, 3, S, S, generator=g), torch.rand(batch, L, generator=g))]
        elif method == 'lut':
            self.model = lut.LUT(cfg).to(device)
            self.teacher = lut.Momentum(self.model)
            batches = [(torch.randn(batch, 3, S, S, generator=g), torch.randn(batch, 3, S, S, generator=g),
                        torch.rand(batch, L, generator=g))]
        elif method == 'ibot':
            self.model = ibot.iBOT(cfg, drop_path=cfg.drop_path).to(device)
            self.teacher = ibot.build_teacher(self.model)
            self.centers = ibot.Centers(cfg.out_dim).to(device)
            n, s = cfg.local_crops_number, cfg.local_size
            mask = torch.rand(2 * batch, L, generator=g) < 0.3  # (2B, L)
            mask[::3] = False  # some global crops unmasked, as the recipe's no_mask_prob does
            batches = [(torch.randn(2 * batch, 3, S, S, generator=g), torch.randn(n * batch, 3, s, s, generator=g),
                        mask)]
        elif method == 'dtm':
            self.model = dtm.DTM(cfg).to(device)
            self.teacher = dtm.build_teacher(cfg, self.model.encoder).to(device)
            mask = torch.rand(batch, L, generator=g).argsort(1) < cfg.num_mask  # (B, L), exactly num_mask True
            batches = [(torch.randn(batch, 3, S, S, generator=g), mask)]
        else:  # finetune.run_finetune / train, as bench.make_finetune_step builds it: the head keeps the ViT's
            #    xavier init (run_finetune's std 2e-5 head would make every loss log(C), whatever the precision)
            self.model = finetune.build_backbone(cfg, NUM_CLASSES, verbose=False).to(device)
            self.model.pos_embed.requires_grad_(True)
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)  # the EMA (--ema), as train()
            self.mixer = finetune.batch_mixer(cfg.mixup, cfg.cutmix, NUM_CLASSES)
            batches = [(torch.randn(batch, 3, S, S, generator=g), torch.randint(0, NUM_CLASSES, (batch,), generator=g))]
        self.batches = [tuple(t.to(device) for t in b) for b in batches]
        self.step_index = 0

    def sched(self):
        """The file's own schedules at the current step: no warm-up, lr 1e-3, 100 steps in all."""
        s, cfg = self.step_index, self.cfg
        if self.method == 'ibot':
            return ibot.schedules(s, cfg, LR, 0, 100, 10)
        if self.method == 'dtm':
            return dtm.schedules(s, cfg, LR, 0, 100, 0)
        if self.method == 'finetune':
            return {'lr': finetune.lr_at(s, LR, cfg.min_lr, 0, 100)}
        return self.mod.schedules(s, cfg, LR, 0, 100)

    def optimizer(self, fused=False):
        """AdamW as main() builds it: fused on CUDA (fused=True), multi-tensor (foreach) otherwise; fine-tuning's
        groups carry the layer-decay lr_scale."""
        groups = (finetune.param_groups(self.model, self.cfg.weight_decay, self.cfg.layer_decay)
                  if self.method == 'finetune' else self.mod.param_groups(self.model, self.cfg.weight_decay))
        return torch.optim.AdamW(groups, lr=LR, betas=BETAS[self.method], fused=fused, foreach=not fused)

    def compiled(self):
        """The model as main() wraps it in one process under --compile: fwd = torch.compile(model); lut and ibot
        compile their teacher in place (Module.compile), so it keeps its parameter names for the EMA; finetune's
        EMA stays eager (train() only evaluates it)."""
        if self.method in ('lut', 'ibot'):
            self.teacher.compile()
        return torch.compile(self.model)

    def step(self, optimizer, scaler, autocast, fwd=None):
        """One train_step of the method, on fwd (default: the eager model), drop path seeded as main() seeds it ->
        its STATS vector (on the device)."""
        fwd = self.model if fwd is None else fwd
        sched = self.sched()
        torch.manual_seed(self.mod.step_seed(self.cfg.seed, 0, self.step_index))
        self.step_index += 1
        if self.method == 'mae':
            return mae.train_step(fwd, self.model, optimizer, scaler, autocast, self.batches, sched, self.cfg)
        if self.method == 'ibot':
            return ibot.train_step(fwd, self.model, self.teacher, self.centers, optimizer, scaler, autocast,
                                   self.batches, sched, self.cfg)
        if self.method == 'finetune':
            return finetune.train_step(fwd, self.model, self.teacher, optimizer, scaler, autocast, self.batches,
                                       sched, self.cfg, NUM_CLASSES, self.mixer, self.cfg.smoothing)
        return self.mod.train_step(fwd, self.model, self.teacher, optimizer, scaler, autocast, self.batches, sched,
                                   self.cfg)

    def state(self):
        """Every tensor a step changes, by name, as fp32 CPU copies: model, teacher (or EMA), centers."""
        out = {f'model.{k}': v for k, v in self.model.state_dict().items()}
        if self.teacher is not None:
            out.update({f'teacher.{k}': v for k, v in self.teacher.state_dict().items()})
        if self.centers is not None:
            out.update({f'centers.{k}': v for k, v in self.centers.state_dict().items()})
        return {k: v.detach().float().cpu().clone() for k, v in out.items()}


def precision(case, dtype, scale=None):
    """(autocast, scaler) from the method's own setup_precision for --dtype `dtype` on the case's device type;
    `scale` sets the GradScaler's initial scale (through its state dict)."""
    _, autocast, scaler = case.mod.setup_precision(SimpleNamespace(dtype=dtype), case.device.split(':')[0])
    if scale is not None:
        scaler.load_state_dict({**scaler.state_dict(), 'scale': scale})
    return autocast, scaler


def key_bias(name, v):
    """The key third of an attention qkv bias: softmax ignores a per-query constant, so its gradient is zero in
    exact arithmetic and Adam turns round-off there into steps of order lr in either run; left out of comparisons."""
    if name.endswith('attn.qkv.bias'):
        d = v.numel() // 3
        return torch.cat([v[:d], v[2 * d:]])
    return v


def assert_close_states(a, b, atol=STATE_ATOL, frac=1e-3, what=''):
    """All but a fraction `frac` of the elements within atol. Adam divides each gradient by its own running norm, so
    an element whose gradient is ~0 (a sum that nearly cancels) moves by up to lr on round-off alone; a real
    difference (a wrong gradient, a missed EMA) moves whole tensors."""
    far, total, worst = 0, 0, (0.0, '')
    for k in a:
        x, y = key_bias(k, a[k]), key_bias(k, b[k])
        d = (x - y).abs()
        far, total = far + int((d > atol + 1e-4 * y.abs()).sum()), total + d.numel()
        worst = max(worst, (d.max().item() if d.numel() else 0.0, k))
    assert far <= frac * total, f'{what}{far} of {total} elements differ by > {atol}; worst {worst[1]}: {worst[0]:.3g}'


def moved(before, after, prefix):
    """The names under `prefix` whose values changed by more than 10x the comparison tolerance."""
    return {k for k in before if k.startswith(prefix) and (before[k] - after[k]).abs().max() > 10 * STATE_ATOL}


# ----------------------------------------------------------------------------- checks, on any device


def check_compiled_equals_eager(method, device, steps=2):
    """fp32: `steps` train_steps with the model compiled as main() compiles it equal the eager steps (stats, model,
    teacher, centers), and both move the weights and the teacher (so the comparison can fail)."""
    torch._dynamo.reset()
    eager, comp = Case(method, device), Case(method, device)
    start = eager.state()
    ac, sc = precision(eager, 'fp32')
    opt_e, opt_c = eager.optimizer(), comp.optimizer()
    fwd = comp.compiled()
    for i in range(steps):
        se = eager.step(opt_e, sc, ac)
        scomp = comp.step(opt_c, sc, ac, fwd)
        assert torch.allclose(se.cpu(), scomp.cpu(), rtol=COMPILE_LOSS_RTOL, atol=1e-6), (i, se, scomp)
    a, b = eager.state(), comp.state()
    assert_close_states(a, b, what='compiled vs eager: ')
    assert moved(start, a, 'model.') and (eager.teacher is None or moved(start, a, 'teacher.'))
    torch._dynamo.reset()


def check_autocast_close_to_fp32(method, device, dtype, rtol):
    """One step under `dtype` autocast (fp16: with a GradScaler at FP16_SCALE): every stat and weight finite, the
    weights updated, the loss within rtol of the fp32 step on the same batch and weights."""
    device_type = device.split(':')[0]
    ref, low = Case(method, device), Case(method, device)
    start = low.state()
    ac32, sc32 = precision(ref, 'fp32')
    s32 = ref.step(ref.optimizer(), sc32, ac32)
    ac, sc = precision(low, dtype, scale=FP16_SCALE if dtype == 'fp16' else None)
    s = low.step(low.optimizer(fused=device_type == 'cuda'), sc, ac)
    after = low.state()
    assert torch.isfinite(s).all() and all(torch.isfinite(v).all() for v in after.values()), s
    assert moved(start, after, 'model.')
    loss, loss32 = s[0].item(), s32[0].item()
    assert abs(loss - loss32) <= rtol * abs(loss32), (dtype, loss, loss32)
    return loss, loss32


def check_fp16_scaler_skips_overflow(method, device, fused=None):
    """fp16 + GradScaler: with a scale of 2^100 the fp16 gradients overflow (the forward does not); the step must
    leave the parameters and the optimizer untouched and halve the scale (GradScaler's backoff 0.5). The next step
    at a sane scale updates. fused: the optimizer main() builds on that device (fused on CUDA) unless given."""
    case = Case(method, device)
    start = case.state()
    opt = case.optimizer(fused=device.startswith('cuda') if fused is None else fused)
    ac, sc = precision(case, 'fp16', scale=2.0 ** 100)
    s = case.step(opt, sc, ac)
    after = case.state()
    assert torch.isfinite(s[0]), s  # the forward (and the loss) are fine; the scaled gradients are not
    assert sc.get_scale() == 2.0 ** 99
    for st in opt.state.values():  # AdamW skipped: no state (foreach), or the fused kernel's zero moments, step 0
        assert float(st['step']) == 0 and not st['exp_avg'].any() and not st['exp_avg_sq'].any()
    params = {f'model.{n}' for n, _ in case.model.named_parameters()}  # BN statistics move in any forward
    for k in params:
        assert torch.equal(start[k], after[k]), k
    sc.update(FP16_SCALE)  # a scale at which these gradients fit in fp16: the next step goes through
    case.step(opt, sc, ac)
    assert moved(start, case.state(), 'model.') and all(torch.isfinite(v).all() for v in case.state().values())
    assert sc.get_scale() == FP16_SCALE  # no overflow: unchanged (it grows only after 2000 clean steps)


def check_fused_equals_foreach(method, device, steps=3):
    """fp32: `steps` train_steps with fused AdamW equal the same steps with multi-tensor AdamW."""
    a, b = Case(method, device), Case(method, device)
    start = a.state()
    ac, sc = precision(a, 'fp32')
    opt_a, opt_b = a.optimizer(fused=True), b.optimizer(fused=False)
    for _ in range(steps):
        sa, sb = a.step(opt_a, sc, ac), b.step(opt_b, sc, ac)
        assert torch.allclose(sa.cpu(), sb.cpu(), rtol=1e-5, atol=1e-7), (sa, sb)
    sa_, sb_ = a.state(), b.state()
    assert_close_states(sa_, sb_, what='fused vs foreach: ')
    assert moved(start, sa_, 'model.')


# ----------------------------------------------------------------------------- the CPU tests


def cpu_fp16_works():
    """fp16 autocast and a GradScaler on the CPU (torch >= 2.3)."""
    try:
        torch.amp.GradScaler('cpu')
        with torch.autocast('cpu', dtype=torch.float16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return False


NEEDS_CXX = pytest.mark.skipif(not any(shutil.which(c) for c in ('g++', 'c++', 'clang++')),
                               reason="no C++ compiler: torch.compile's CPU backend (inductor) needs one")
NEEDS_CPU_FP16 = pytest.mark.skipif(not cpu_fp16_works(), reason='this torch has no fp16 autocast / GradScaler on '
                                                                 'the CPU')


@NEEDS_CXX
@pytest.mark.parametrize('method', STEP_METHODS)
def test_compiled_step_equals_eager(method):
    check_compiled_equals_eager(method, 'cpu')


@pytest.mark.parametrize('method', STEP_METHODS)
def test_bf16_autocast_step_close_to_fp32(method):
    check_autocast_close_to_fp32(method, 'cpu', 'bf16', BF16_LOSS_RTOL)


@NEEDS_CPU_FP16
@pytest.mark.parametrize('method', STEP_METHODS)
def test_fp16_autocast_step_close_to_fp32(method):
    check_autocast_close_to_fp32(method, 'cpu', 'fp16', FP16_LOSS_RTOL)


@NEEDS_CPU_FP16
@pytest.mark.parametrize('fused', [False, True], ids=['foreach', 'fused'])
@pytest.mark.parametrize('method', STEP_METHODS)
def test_fp16_grad_scaler_skips_an_overflowing_step(method, fused):
    """Both optimizers: GradScaler skips foreach AdamW's step, and hands the fused kernel found_inf (it then
    leaves its fresh state at zero)."""
    check_fp16_scaler_skips_overflow(method, 'cpu', fused)


@pytest.mark.parametrize('method', STEP_METHODS)
def test_fused_adamw_equals_foreach(method):
    check_fused_equals_foreach(method, 'cpu')


# ----------------------------------------------------------------------------- main()'s --compile wiring


def run_main(method, tmp_path, name, *extra):
    out = str(tmp_path / name)
    MODULES[method].main(COMMON + ARGS[method] + ['--batch_size', '4', '--max_steps', '2', '--lr', '1e-3',
                                                  '--warmup_epochs', '0', '--log_every', '1', '--device', 'cpu',
                                                  '--out_dir', out] + list(extra))
    return load_ckpt(out)


@pytest.mark.parametrize('method', METHODS)
def test_main_compile_flag_trains_like_eager(method, tmp_path, monkeypatch):
    """main() --compile true, with torch.compile on dynamo's 'eager' backend (the same OptimizedModule wrappers and
    graph capture, no code generation: seconds, not minutes), trains to the same checkpoint as --compile false:
    the teacher's EMA still finds its parameters and the checkpoint holds the raw modules' names."""
    real = torch.compile
    calls = []

    def compile_eager(model=None, **kw):
        calls.append(type(model).__name__)
        return real(model, backend='eager')
    monkeypatch.setattr(torch, 'compile', compile_eager)
    torch._dynamo.reset()
    comp = run_main(method, tmp_path, 'compiled', '--compile', 'true')
    torch._dynamo.reset()
    assert calls  # main() did compile
    eager = run_main(method, tmp_path, 'eager')
    for part in ('model', 'teacher', 'centers'):
        if part in eager:
            assert eager[part].keys() == comp[part].keys(), part  # no '_orig_mod.' prefixes
            for k in eager[part]:
                x, y = key_bias(k, eager[part][k].float()), key_bias(k, comp[part][k].float())
                assert torch.allclose(x, y, atol=1e-6), (part, k)


# ----------------------------------------------------------------------------- the GPU start-up and resume crashes


def no_cuda_calls(monkeypatch):
    """Make every CUDA entry point a setup function might touch raise: what runs after this never touched CUDA."""
    def touched(*a, **k):
        raise AssertionError('CUDA was touched')
    for name in ('is_available', 'set_device', 'device_count', 'current_device', 'init', 'get_device_name'):
        monkeypatch.setattr(torch.cuda, name, touched)


@pytest.mark.parametrize('method', METHODS)
def test_resolve_device_indexes_cuda_without_touching_it(method, monkeypatch):
    """`--device cuda` becomes 'cuda:0' in one process and 'cuda:LOCAL_RANK' under torchrun (each process its own GPU);
    an explicit index is kept in one process; no CUDA call is made (it runs before any CUDA set-up)."""
    no_cuda_calls(monkeypatch)
    resolve = MODULES[method].resolve_device
    assert resolve('cuda', 0, False, True) == 'cuda:0'  # the crash: torch.cuda.set_device('cuda') raises
    assert resolve('cuda', 3, True, True) == 'cuda:3'
    assert resolve('cuda:1', 0, False, True) == 'cuda:1'
    assert resolve('cuda:0', 5, True, True) == 'cuda:5'  # under torchrun LOCAL_RANK picks the GPU
    assert resolve('', 2, True, True) == 'cuda:2' and resolve('', 0, False, True) == 'cuda:0'
    assert resolve('', 0, False, False) == 'cpu' and resolve('cpu', 1, True, True) == 'cpu'


@pytest.mark.parametrize('script', ['mae', 'lut', 'ibot', 'dtm', 'finetune', 'eval_seg', 'analyze', 'bench'])
def test_a_device_that_is_not_there_or_not_a_device_stops_in_one_line(script, capsys):
    """--device gpu (not a device) and --device cuda on this CPU machine: one `error:` line that lists the accepted
    values or says CUDA is missing, from the first thing main() does, in every script that takes --device."""
    import importlib
    mod = importlib.import_module(script)
    if torch.cuda.is_available():
        pytest.skip('CUDA is available here')
    for flag, expected in (('gpu', "--device must be cuda, cuda:N or cpu, got 'gpu'"),
                           ('cuda:', "--device must be cuda, cuda:N or cpu, got 'cuda:'"),
                           ('cuda', '--device cuda: CUDA is not available here'),
                           ('cuda:1', '--device cuda:1: CUDA is not available here')):
        argv = ['--device', flag] + (['--checkpoint', 'none'] if script in ('finetune', 'eval_seg') else [])
        with pytest.raises(SystemExit) as e:
            mod.main(argv)
        msg = str(e.value)
        assert msg.startswith('error: ' + expected) and '\n' not in msg, (script, flag, msg)
        assert 'use --device cpu' in msg or 'cuda, cuda:N or cpu' in msg


@pytest.fixture
def keep_tf32():
    """Put back the TF32 switches a CUDA set-up turns on (they are global to the process)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize('method,ddp', [(m, d) for m in METHODS for d in (False, True)])
def test_setup_distributed_sets_an_indexed_cuda_device(method, ddp, monkeypatch, keep_tf32):
    """setup_distributed with --device cuda on a (pretended) GPU machine hands torch.cuda.set_device a device with an
    index, one process (cuda:0) or rank 1 of torchrun (cuda:1, process group on NCCL)."""
    seen = {}
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: seen.setdefault('device', str(d)))
    monkeypatch.setattr(torch.distributed, 'init_process_group', lambda backend: seen.setdefault('backend', backend))
    for k, v in (dict(RANK='1', LOCAL_RANK='1', WORLD_SIZE='2') if ddp else {}).items():
        monkeypatch.setenv(k, v)
    if not ddp:
        monkeypatch.delenv('RANK', raising=False)
    out = MODULES[method].setup_distributed(SimpleNamespace(device='cuda', seed=0))
    assert out[-1] == seen['device'] == ('cuda:1' if ddp else 'cuda:0')
    assert seen.get('backend') == ('nccl' if ddp else None)


class SetDevice(Exception):
    pass


@pytest.mark.parametrize('script', ['finetune', 'eval_seg'])
def test_evaluation_scripts_set_an_indexed_cuda_device(script, monkeypatch, keep_tf32):
    """finetune.py / eval_seg.py --device cuda in one process on a (pretended) GPU machine: main() must hand
    torch.cuda.set_device an indexed device; it is stopped right there."""
    import importlib
    mod = importlib.import_module(script)

    def set_device(d):
        torch.cuda._utils._get_device_index(d)  # what torch.cuda.set_device does first: 'cuda' raises ValueError
        raise SetDevice(str(d))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'set_device', set_device)
    monkeypatch.delenv('RANK', raising=False)
    with pytest.raises(SetDevice, match='^cuda:0$'):
        mod.main(['--checkpoint', 'none', '--device', 'cuda'])


class OnDevice:
    """Stands for a tensor on a GPU (none here): it hands back its values only when asked for a CPU copy."""

    def __init__(self, t):
        self.t = t

    def detach(self):
        return self

    def to(self, *args, **kw):
        dev = kw.get('device', args[0] if args else None)
        return self.t.clone() if dev is not None and torch.device(dev).type == 'cpu' else self

    def cpu(self):
        return self.t.clone()


def test_backbone_state_dict_is_cpu_tensors(monkeypatch):
    """A checkpoint's `encoder` (vit.backbone_state_dict) holds CPU tensors whatever device the model is on, so a
    machine without a GPU loads it: here the model's state_dict hands out stand-ins for GPU tensors."""
    enc = vit.vit('pico', img_size=16, patch_size=4, num_classes=0, mask_token=True)
    real = enc.state_dict()
    monkeypatch.setattr(enc, 'state_dict', lambda *a, **k: {n: OnDevice(v) for n, v in real.items()})
    sd = vit.backbone_state_dict(enc)
    assert sd and all(isinstance(v, torch.Tensor) and v.device.type == 'cpu' for v in sd.values())
    assert all(torch.equal(v, real[n]) for n, v in sd.items())
    assert 'mask_token' in real and 'mask_token' not in sd  # the backbone only


@NEEDS_CPU_FP16
@pytest.mark.parametrize('method', METHODS)
def test_restore_skips_an_empty_scaler_state(method):
    """restore(): a disabled GradScaler (bf16 / fp32 run) saved {}; an fp16 run resuming from it keeps its fresh
    scaler, an fp16 state is restored into an fp16 run, and a bf16 run ignores an fp16 run's state."""
    restore = MODULES[method].restore
    fp16 = torch.amp.GradScaler('cpu', init_scale=2.0 ** 16)
    restore({'scaler': torch.amp.GradScaler('cpu', enabled=False).state_dict()}, {'scaler': fp16})  # bf16 -> fp16
    assert fp16.get_scale() == 2.0 ** 16
    saved = torch.amp.GradScaler('cpu', init_scale=2.0 ** 7).state_dict()
    restore({'scaler': saved}, {'scaler': fp16})  # fp16 -> fp16
    assert fp16.get_scale() == 2.0 ** 7
    off = torch.amp.GradScaler('cpu', enabled=False)
    restore({'scaler': saved}, {'scaler': off})  # fp16 -> bf16
    assert not off.is_enabled()


@NEEDS_CPU_FP16
def test_resume_switching_between_bf16_and_fp16(tmp_path):
    """mae.main on the CPU: a bf16 run resumed with fp16, that one resumed with bf16; each checkpoint's scaler holds
    the state of its own run's --dtype and its `encoder` is CPU tensors."""
    out = str(tmp_path / 'run')
    common = COMMON + ARGS['mae'] + ['--batch_size', '4', '--lr', '1e-3', '--warmup_epochs', '0', '--device', 'cpu',
                                     '--out_dir', out]
    mae.main(common + ['--dtype', 'bf16', '--max_steps', '1'])
    assert load_ckpt(out)['scaler'] == {}
    mae.main(common + ['--dtype', 'fp16', '--max_steps', '2', '--resume', 'auto'])
    ck = load_ckpt(out)
    assert ck['step'] == 2 and ck['scaler']['scale'] > 0
    mae.main(common + ['--dtype', 'bf16', '--max_steps', '3', '--resume', 'auto'])
    ck = torch.load(os.path.join(out, 'checkpoint.pt'), weights_only=True)
    assert ck['step'] == 3 and ck['scaler'] == {} and ck['config']['dtype'] == 'bf16'
    assert all(v.device.type == 'cpu' for v in ck['encoder'].values())
    assert all(torch.isfinite(v).all() for v in ck['model'].values())
