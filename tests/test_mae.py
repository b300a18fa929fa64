"""mae.py: loss and target against hand-computed values, learning, gradient accumulation, resume, DDP, precision,
checkpoint contract, bad input and atomic saves."""
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import mae
import vit
from conftest import ROOT, load_ckpt, run_script, run_torchrun

TINY = ['--img_size', '32', '--patch_size', '8', '--decoder_dim', '32', '--decoder_depth', '1', '--decoder_heads', '2',
        '--num_workers', '0', '--log_every', '1']


def run(tmp_path, name, *extra):
    out = str(tmp_path / name)
    mae.main(TINY + ['--out_dir', out] + list(extra))
    return out


def test_random_masking_invariants():
    torch.manual_seed(0)
    noise = torch.rand(5, 49)
    ids_shuffle, ids_restore, K = mae.random_masking(noise, 0.75)
    assert K == 12
    ar = torch.arange(49).expand(5, -1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), ar)  # ids_restore inverts ids_shuffle
    mask = mae.mask_from_ids(ids_shuffle[:, :K], 49)
    assert torch.equal(mask.sum(1), torch.full((5,), 37.0))
    for b in range(5):  # the mask marks exactly the removed set, and kept = the K smallest noise values
        kept = set(ids_shuffle[b, :K].tolist())
        assert kept == set(torch.nonzero(mask[b] == 0).flatten().tolist())
        assert kept == set(noise[b].argsort()[:K].tolist())
    assert len({tuple(sorted(ids_shuffle[b, :K].tolist())) for b in range(5)}) == 5  # per-sample masks differ


def test_loss_hand_computed_and_ignores_visible_patches():
    # 2 images x 4 patches x 2 values; mask 1 = removed
    pred = torch.tensor([[[1., 1.], [0., 0.], [2., 0.], [5., 5.]],
                         [[0., 0.], [1., 3.], [0., 0.], [0., 0.]]])
    target = torch.zeros(2, 4, 2)
    mask = torch.tensor([[1., 0., 1., 0.], [0., 1., 0., 0.]])
    # per-patch MSE: img0 removed patches 0 -> 1, 2 -> 2; img1 removed patch 1 -> 5; mean over 3 = 8/3
    assert torch.isclose(mae.mae_loss(pred, target, mask), torch.tensor(8 / 3))
    pred2 = pred.clone()
    pred2[0, 1] = 100.0
    pred2[1, 3] = -7.0  # visible patches: predictions there do not matter
    assert torch.isclose(mae.mae_loss(pred2, target, mask), torch.tensor(8 / 3))


def test_norm_pix_target_formula():
    img = torch.zeros(1, 3, 2, 2)
    img[0, 0] = torch.tensor([[1., 2.], [3., 4.]])  # one 2x2 patch, values 1..4 in channel 0, zeros elsewhere
    t = mae.pixel_target(img, 2, norm_pix=True)[0, 0]
    vals = torch.tensor([1., 0, 0, 2, 0, 0, 3, 0, 0, 4, 0, 0])  # (p, q, c) order
    mean, var = vals.mean(), vals.var(unbiased=True)
    assert torch.allclose(t, (vals - mean) / (var + 1e-6).sqrt(), atol=1e-6)
    assert torch.equal(mae.pixel_target(img, 2, norm_pix=False)[0, 0], vals)



def test_unnormalize_prediction_hand_computed():
    """Patches [0, 2], [4, 4], [1, 5] (means 1, 4, 3; unbiased variances 2, 0, 8), the middle one removed, every
    predicted patch [1, -1]. True stats: patch 1 becomes 4 +- sqrt(0 + 1e-6). Visible stats: the mean of the visible
    means (1 + 3) / 2 = 2 and of their stds (sqrt 2 + sqrt 8) / 2 = 1.5 sqrt 2, for every patch of the image."""
    target = torch.tensor([[[0.0, 2.0], [4.0, 4.0], [1.0, 5.0]]])  # (B=1, L=3, P=2)
    mask = torch.tensor([[0.0, 1.0, 0.0]])
    pred = torch.tensor([1.0, -1.0]).expand(1, 3, 2)
    true_stats, vis_stats = mae.unnormalize_prediction(pred, target, mask)
    assert torch.allclose(true_stats[0, 1], torch.tensor([4.001, 3.999]), atol=1e-6)
    s = 1.5 * 2 ** 0.5
    assert torch.allclose(vis_stats[0], torch.tensor([2 + s, 2 - s]).expand(3, 2), atol=1e-5)

def test_model_masks_exact_count():
    cfg = SimpleNamespace(model='tiny', img_size=32, patch_size=8, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    m = mae.MAE(cfg)
    loss, pred, mask = m(torch.randn(3, 3, 32, 32), torch.rand(3, 16), 0.75, True)
    assert pred.shape == (3, 16, 192) and torch.equal(mask.sum(1), torch.full((3,), 12.0)) and loss.ndim == 0


def test_lr_schedule():
    assert mae.lr_at(0, 1.0, 0.0, 10, 110) == 0.0
    assert mae.lr_at(5, 1.0, 0.0, 10, 110) == 0.5
    assert mae.lr_at(10, 1.0, 0.0, 10, 110) == 1.0
    assert abs(mae.lr_at(60, 1.0, 0.0, 10, 110) - 0.5) < 1e-9
    assert abs(mae.lr_at(110, 1.0, 0.1, 10, 110) - 0.1) < 1e-9


def test_param_groups_no_decay_on_bias_and_norms_only():
    """Official MAE pre-training (timm add_weight_decay, no skip list): only biases and 1-D params are exempt; the
    [CLS] and mask tokens are decayed; the fixed sin-cos position embeddings are not trained at all."""
    cfg = SimpleNamespace(model='tiny', img_size=32, patch_size=8, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    m = mae.MAE(cfg)
    decay, no_decay = mae.param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay['params']}
    d = {names[id(p)] for p in decay['params']}
    assert {'mask_token', 'encoder.cls_token', 'encoder.patch_embed.proj.weight', 'decoder_pred.weight'} <= d
    assert {'encoder.blocks.0.norm1.weight', 'encoder.blocks.0.attn.qkv.bias', 'decoder_norm.bias'} <= nd
    assert not {'encoder.pos_embed', 'decoder_pos_embed'} & (d | nd)  # fixed: not trained at all
    assert all(p.ndim <= 1 for p in no_decay['params']) and all(p.ndim >= 2 for p in decay['params'])
    assert d | nd == {n for n, p in m.named_parameters() if p.requires_grad}
    assert decay['weight_decay'] == 0.05 and no_decay['weight_decay'] == 0.0


def test_short_run_lowers_loss_and_writes_outputs(tmp_path):
    out = run(tmp_path, 'a', '--batch_size', '16', '--max_steps', '30', '--lr', '2e-3', '--warmup_epochs', '0')
    import json
    losses = [json.loads(l)['loss'] for l in open(os.path.join(out, 'log.jsonl'))]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    assert os.path.getsize(os.path.join(out, 'recon.png')) > 1000
    ck = load_ckpt(out)
    assert ck['method'] == 'mae' and ck['step'] == 30 and ck['config']['batch_size'] == 16
    enc = vit.vit('tiny', img_size=32, patch_size=8, num_classes=0)
    enc.load_state_dict(ck['encoder'], strict=True)  # the `encoder` entry is a plain ViT backbone


def params(out):
    return load_ckpt(out)['model']


def assert_same_params(a, b):
    """Equal up to fp32 round-off. The attention key bias is left out: softmax is shift-invariant, so its gradient
    is zero in exact arithmetic and Adam turns round-off there into steps of order lr in either run."""
    for k in a:
        x, y = a[k], b[k]
        if k.endswith('attn.qkv.bias'):
            d = x.numel() // 3
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        assert torch.allclose(x, y, atol=2e-6, rtol=1e-4), k


def test_grad_accumulation_equals_big_batch(tmp_path):
    common = ['--max_steps', '2', '--lr', '1e-3', '--warmup_epochs', '0']
    a = params(run(tmp_path, 'big', '--batch_size', '8', *common))
    b = params(run(tmp_path, 'acc', '--batch_size', '4', '--accum_iter', '2', *common))
    assert_same_params(a, b)


def test_resume_equals_uninterrupted(tmp_path):
    common = ['--batch_size', '4', '--lr', '1e-3', '--warmup_epochs', '0']
    a = run(tmp_path, 'straight', '--max_steps', '4', *common)
    run(tmp_path, 'split', '--max_steps', '2', *common)
    b = run(tmp_path, 'split', '--max_steps', '4', '--resume', 'auto', *common)
    pa, pb = load_ckpt(a), load_ckpt(b)
    assert pb['step'] == 4
    for k in pa['model']:
        assert torch.equal(pa['model'][k], pb['model'][k]), k
    assert torch.equal(pa['optimizer']['state'][0]['exp_avg'], pb['optimizer']['state'][0]['exp_avg'])


def test_ddp_two_processes_equal_one_process(tmp_path):
    common = TINY + ['--max_steps', '2', '--lr', '1e-3', '--warmup_epochs', '0', '--device', 'cpu']
    run_torchrun('mae.py', common + ['--batch_size', '4', '--out_dir', str(tmp_path / 'ddp')])
    single = params(run(tmp_path, 'single', '--batch_size', '8', '--max_steps', '2', '--lr', '1e-3',
                        '--warmup_epochs', '0'))
    assert_same_params(single, params(str(tmp_path / 'ddp')))


def test_bf16_autocast_runs_on_cpu(tmp_path):
    out = run(tmp_path, 'bf16', '--batch_size', '4', '--max_steps', '2', '--dtype', 'bf16')
    assert load_ckpt(out)['step'] == 2


def test_compile_flag_constructs(tmp_path):
    cfg = mae.get_config(TINY + ['--compile', 'true'])
    assert cfg.compile is True
    try:
        compiled = torch.compile(mae.MAE(cfg))
    except Exception as e:  # pragma: no cover - depends on the platform's compiler support
        pytest.skip(f'torch.compile unavailable here: {e}')
    assert isinstance(compiled, torch.nn.Module)


@pytest.mark.parametrize('args,msg', [
    (['--no_such_flag', '1'], 'unrecognized arguments'),
    (['--data', '/no/such/folder'], 'does not exist'),
    (['--img_size', '30'], 'not divisible'),
    (['--mask_ratio', '1.5'], 'mask_ratio'),
    (['--model', 'gigantic'], '--model must be one of'),
    (['--decode', 'gpu'], '--decode must be cpu, or gpu with --data an image folder'),
])
def test_bad_input_one_clear_line(args, msg, capsys, tmp_path):
    # in-process: argparse's error (usage + one line, exit 2) or main()'s sys.exit('error: ...'), no exception
    with pytest.raises(SystemExit) as e:
        mae.main(args + ['--max_steps', '1', '--out_dir', str(tmp_path), '--num_workers', '0'])
    err = capsys.readouterr().err + (e.value.code if isinstance(e.value.code, str) else '')
    assert e.value.code not in (0, None) and msg in err


@pytest.mark.parametrize('args,msg', [(['--no_such_flag', '1'], 'unrecognized arguments'),
                                      (['--data', '/no/such/folder'], 'does not exist')])
def test_bad_input_on_the_command_line_is_one_line_without_traceback(args, msg, tmp_path):
    r = run_script('mae.py', args + ['--max_steps', '1', '--out_dir', str(tmp_path)])
    assert r.returncode != 0
    assert msg in r.stderr and 'Traceback' not in r.stderr


def test_gpu_decode_path_trains_on_a_jpeg_folder(tmp_path):
    # --decode gpu on the CPU: workers send JPEG bytes + boxes, gpu_decode_batch decodes; the first loss equals the
    # PIL path's, since both see the same crops, flips and masks (up to JPEG decoder round-off)
    import json
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for k in range(8):
        (tmp_path / 'jpg' / 'train' / f'c{k % 2}').mkdir(parents=True, exist_ok=True)
        grid = (rng.random((4, 5, 3)) * 255).astype(np.uint8)
        Image.fromarray(grid).resize((50, 40), Image.BICUBIC).save(tmp_path / 'jpg' / 'train' / f'c{k % 2}' / f'{k}.jpg')
    common = ['--data', str(tmp_path / 'jpg'), '--model', 'tiny', '--batch_size', '4', '--device', 'cpu']
    gpu = run(tmp_path, 'gpu', '--decode', 'gpu', '--max_steps', '2', *common)
    cpu = run(tmp_path, 'cpu', '--max_steps', '1', *common)
    assert load_ckpt(gpu)['step'] == 2 and load_ckpt(gpu)['config']['decode'] == 'gpu'
    first = [json.loads(open(os.path.join(o, 'log.jsonl')).readline())['loss'] for o in (gpu, cpu)]
    assert abs(first[0] - first[1]) < 1e-2 * first[1]


def test_resume_refuses_other_method_or_size(tmp_path):
    out = tmp_path / 'x'
    out.mkdir()
    torch.save({'method': 'lut', 'config': {}}, out / 'checkpoint.pt')
    with pytest.raises(SystemExit, match='is a LUT checkpoint, not an MAE checkpoint'):
        mae.main(TINY + ['--out_dir', str(out), '--resume', 'auto'])
    torch.save({'method': 'mae', 'config': {'model': 'small', 'img_size': 32, 'patch_size': 8, 'decoder_dim': 32,
                                            'decoder_depth': 1, 'decoder_heads': 2}}, out / 'checkpoint.pt')
    with pytest.raises(SystemExit, match='model=small'):
        mae.main(TINY + ['--out_dir', str(out), '--resume', 'auto'])


def test_killed_save_never_leaves_a_torn_checkpoint(tmp_path):
    path = tmp_path / 'checkpoint.pt'
    mae.save_checkpoint(str(path), {'step': -1, 'w': torch.zeros(10)})
    code = (f'import sys, torch; sys.path.insert(0, {ROOT!r}); import mae\n'
            f'for i in range(1000):\n'
            f'    mae.save_checkpoint({str(path)!r}, {{"step": i, "w": torch.full((4_000_000,), float(i))}})\n')
    proc = subprocess.Popen([sys.executable, '-c', code])
    time.sleep(6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = torch.load(path, weights_only=True)  # whatever step it reached, the file is whole
    assert ck['w'].numel() in (10, 4_000_000) and bool((ck['w'] == ck['w'][0]).all())
    with pytest.raises(Exception):
        mae.save_checkpoint(str(path), {'bad': lambda: 0})  # an unpicklable state fails before the rename...
    assert torch.load(path, weights_only=True)['step'] == ck['step']  # ...and the old checkpoint survives
    assert not os.path.exists(f'{path}.tmp.{os.getpid()}')  # the failed save removed its temp file
