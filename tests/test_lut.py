"""lut.py: the two views (independent crops, colour on view 2 only), disjoint two-view masks, EMA update and
momentum schedule, L_BC against hand-computed values, no gradient into the target branch, global-batch BatchNorm,
learning, resume, DDP == one process, bad input."""
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn as nn
from torchvision.transforms import v2

import data
import lut
import vit
from conftest import load_ckpt, run_torchrun

TINY = ['--img_size', '32', '--patch_size', '8', '--decoder_dim', '32', '--decoder_depth', '1', '--decoder_heads', '2',
        '--head_dim', '64', '--num_workers', '0', '--log_every', '1']
FAST = ['--lr', '1e-3', '--warmup_epochs', '1e-9']  # constant lr from step 0


def run(out, *extra):
    lut.main(TINY + ['--out_dir', str(out)] + list(extra))
    return str(out)


def tiny_model():
    return lut.LUT(lut.get_config(TINY))

# -----------------------------------------------------------------------------
# recipe: the two views (official TwoGlobalViewAugmentation)


def src_params(view, img):
    """(dy, dx, flip) such that the normalised `view` is exactly `img` (uint8 (3, S, S)) reflect-padded by 4 px,
    cropped at offset (4 + dy, 4 + dx) and flipped if `flip`; None if no such shift / flip exists."""
    pixels = (data.denormalize(view[None])[0] * 255).round()  # back to the uint8 values, exactly
    padded = torch.nn.functional.pad(img[None].float(), (4, 4, 4, 4), mode='reflect')[0]
    S = img.shape[-1]
    for flip in (False, True):
        for dy in range(9):
            for dx in range(9):
                crop = padded[:, dy:dy + S, dx:dx + S]
                if torch.equal(crop.flip(-1) if flip else crop, pixels):
                    return dy - 4, dx - 4, flip
    return None


def test_lut_views_independent_shift_and_flip_view1_colour_untouched():
    """Official TwoGlobalViewAugmentation: each view is its own simple resized crop (an S x S image: resize is a
    no-op, then a random crop of the 4-px reflect-padded image and a flip), so each view is the image shifted by
    at most 4 px and maybe flipped, the two drawn independently; view 1 has no colour change at all."""
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tf = lut.LUTTransform(32)
    geometry_only = lut.LUTTransform(32)
    geometry_only.strong = v2.Identity()  # view 2 without its colour augmentation: its geometry alone
    same, colour_changed = 0, 0
    for seed in range(20):
        torch.manual_seed(seed)
        v1, v2_ = geometry_only(img)
        p1, p2 = src_params(v1, img), src_params(v2_, img)
        assert p1 is not None and p2 is not None  # each view: a <= 4 px shift, maybe flipped, exact pixels
        same += p1 == p2
        torch.manual_seed(seed)
        w1, w2 = tf(img)
        assert torch.equal(w1, v1)  # view 1: the same crop and flip, colour untouched
        colour_changed += src_params(w2, img) is None
    assert same <= 2  # independent draws: 1 chance in 162 to coincide
    assert colour_changed >= 15  # view 2: colour jitter (p 0.8), then always grayscale / solarize / blur


def test_src_crop_slides_along_the_longer_side_of_a_photo():
    """Resize keeps the aspect ratio: on a 4:3 image the shorter side becomes S and the longer one 4S/3, and the
    4-px padded random crop may start anywhere along it, so two views are up to 8 px + (4S/3 - S) apart there, not
    8 px as on a square image. 100x75 at S = 24: resized 32 x 24, column offsets 0..16 in the padded image (rows
    0..8); 500x375 at 224: resized 298 wide, offsets 0..82."""
    img = torch.randint(0, 256, (3, 75, 100), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    crop = lut.src_crop(24)
    resized = crop.transforms[1](img)  # the Resize step alone: (3, 24, 32)
    assert resized.shape == (3, 24, 32)
    padded = torch.nn.functional.pad(resized[None].float(), (4, 4, 4, 4), mode='reflect')[0]  # (3, 32, 40)
    offsets = []
    for seed in range(40):
        torch.manual_seed(seed)
        view = crop(img).float()
        found = [(dy, dx) for dy in range(9) for dx in range(17) for flip in (False, True)
                 if torch.equal(view, padded[:, dy:dy + 24, dx:dx + 24].flip(-1) if flip
                                else padded[:, dy:dy + 24, dx:dx + 24])]
        assert found  # every view is a 24 x 24 window of the padded resized image, maybe flipped
        offsets.append(found[0])
    dx = [x for _, x in offsets]
    assert max(dx) - min(dx) > 8  # farther apart than any two views of a square image
    assert lut.src_crop(224).transforms[1](torch.zeros(3, 375, 500, dtype=torch.uint8)).shape[-1] + 8 - 224 == 82


def test_lut_shared_crop_option():
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tf = lut.LUTTransform(32, shared=True)
    tf.strong = v2.Identity()
    for seed in range(5):
        torch.manual_seed(seed)
        v1, v2_ = tf(img)
        assert torch.equal(v1, v2_) and src_params(v1, img) is not None

# -----------------------------------------------------------------------------
# masks


def test_two_view_masks_hand_case():
    noise = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4]])  # L = 8, r = 0.75 -> K = 2
    keep1, keep2, restore = lut.two_view_masks(noise, 0.75)
    assert keep1.tolist() == [[1, 5]]  # the two smallest noise values (0.1, 0.2)
    assert keep2.tolist() == [[3, 7]]  # the next two (0.3, 0.4)
    order = [1, 5, 3, 7, 0, 4, 6, 2]  # positions sorted by noise
    assert restore.tolist() == [[order.index(i) for i in range(8)]]


@pytest.mark.parametrize('ratio', [0.5, 0.75, 0.9])
def test_two_view_masks_disjoint_with_k_each(ratio):
    L = 49
    K = int(L * (1 - ratio))
    keep1, keep2, _ = lut.two_view_masks(torch.rand(32, L), ratio)
    assert keep1.shape == keep2.shape == (32, K) and K >= 1
    for a, b in zip(keep1.tolist(), keep2.tolist()):
        assert len(set(a)) == K and len(set(b)) == K and not set(a) & set(b)
        assert all(0 <= i < L for i in a + b)


def test_model_masks_view1_and_pools_vectors():
    m = tiny_model()
    loss, q1, q2, pred, mask = m(torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.rand(3, 16), 0.75, True)
    assert torch.equal(mask.sum(1), torch.full((3,), 12.0))  # 16 patches, 4 kept
    assert q1.shape == q2.shape == (3, 192) and pred.shape == (3, 16, 192) and loss.ndim == 0


def test_mask_ratio_below_half_rejected(capsys):
    with pytest.raises(ValueError, match='mask_ratio >= 0.5'):
        lut.two_view_masks(torch.rand(2, 16), 0.4)
    with pytest.raises(SystemExit) as e:
        lut.get_config(['--mask_ratio', '0.4'])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'error: --mask_ratio must be in [0.5, 1)' in err and 'Traceback' not in err
    assert lut.get_config(['--mask_ratio', '0.5']).mask_ratio == 0.5


def test_param_groups_decay_tokens_not_biases_or_norms():
    """Official pre-training (timm add_weight_decay, no skip list): only biases and 1-D params (LN, BN) are exempt;
    [CLS] and mask tokens are decayed; the fixed sin-cos position embeddings are not trained at all."""
    m = tiny_model()
    decay, no_decay = lut.param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay['params']}
    d = {names[id(p)] for p in decay['params']}
    assert {'mask_token', 'encoder.cls_token', 'head.0.weight', 'predictor.3.weight'} <= d
    assert {'encoder.blocks.0.norm1.weight', 'decoder_embed.bias', 'head.1.weight', 'head.1.bias'} <= nd  # head.1: BN
    assert not {'encoder.pos_embed', 'decoder_pos_embed'} & (d | nd)
    assert all(p.ndim <= 1 for p in no_decay['params']) and all(p.ndim >= 2 for p in decay['params'])
    assert decay['weight_decay'] == 0.05 and no_decay['weight_decay'] == 0.0


def test_head_and_predictor_xavier_init():
    """Every Linear of the head and predictor is xavier-uniform (official models_lut.py): U(-a, a) with
    a = sqrt(6 / (fan_in + fan_out)), std a / sqrt(3). torch's default (a = 1 / sqrt(fan_in)) gives std 0.042 for
    the D -> Dh layer and 0.072 for Dh -> D here (D 192, Dh 64), xavier 0.088 for both."""
    torch.manual_seed(0)
    m = tiny_model()
    for name in ('head.0', 'head.3', 'predictor.0', 'predictor.3'):
        w = m.get_submodule(name).weight.detach()
        a = math.sqrt(6 / sum(w.shape))
        assert w.abs().max() <= a and abs(w.std().item() / (a / math.sqrt(3)) - 1) < 0.05, name
        assert m.get_submodule(name).bias is None


@pytest.mark.parametrize('args,msg', [(['--crop', 'zoom'], '--crop must be src or rrc'),
                                      (['--w_bc', '-0.5'], '--w_bc'),
                                      (['--no_such_flag', '1'], 'unrecognized arguments')])
def test_bad_input_one_clear_line(args, msg, capsys):
    with pytest.raises(SystemExit):
        lut.get_config(args)
    err = capsys.readouterr().err
    assert msg in err and 'Traceback' not in err


def test_printed_lr_follows_the_official_square_root_rule(tmp_path, capsys):
    """Official main_lut.py: lr = blr * sqrt(effective batch) / 4 (the linear rule is commented out there). Effective
    batch 4 x 2 micro-batches = 8: 1e-3 * sqrt(8) / 4 = 7.07e-4 (the linear rule would give 3.1e-5)."""
    out = run(tmp_path / 'lr', '--batch_size', '4', '--accum_iter', '2', '--max_steps', '1', '--blr', '1e-3',
              '--warmup_epochs', '0')
    cfg = json.loads(next(l for l in capsys.readouterr().out.splitlines() if l.startswith('{')))
    want = 1e-3 * math.sqrt(8) / 4
    assert cfg['effective_batch'] == 8 and cfg['lr'] == pytest.approx(want, rel=1e-12)
    log = [json.loads(l) for l in open(os.path.join(out, 'log.jsonl'))]
    assert log[0]['lr'] == pytest.approx(want, rel=1e-12)  # no warm-up: step 0 runs at the peak lr
    # the recipe's blr 1.5e-4 gives MAE's 2.4e-3 at batch 4096; the embedded default shares that blr (3e-4 at 64)
    assert lut.get_config([]).blr == lut.get_config(['--data', '/some/imagenet']).blr == 1.5e-4
    assert 1.5e-4 * math.sqrt(4096) / 4 == pytest.approx(1.5e-4 * 4096 / 256)


def test_w_bc_default_by_model():
    assert lut.get_config([]).w_bc == 1.0  # embedded default: tiny
    assert lut.get_config(['--model', 'small']).w_bc == 1.0
    assert lut.get_config(['--model', 'base']).w_bc == 0.25
    assert lut.get_config(['--model', 'large']).w_bc == 0.25
    assert lut.get_config(['--data', '/some/imagenet']).w_bc == 0.25  # folder -> base
    assert lut.get_config(['--model', 'base', '--w_bc', '0.7']).w_bc == 0.7
    assert lut.get_config(['--w_bc', '0']).w_bc == 0.0  # 0 switches L_BC off; it is not 'pick a default'

# -----------------------------------------------------------------------------
# momentum branch


def pair():
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(2))
    a.train()(torch.randn(8, 3))  # different running statistics and num_batches_tracked
    for _ in range(3):
        b.train()(torch.randn(8, 3) + 2)
    return a, b


def test_ema_update_m0_copies_m1_keeps_and_interpolates():
    target, online = pair()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    lut.ema_update(target, online, 1.0)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k] if v.is_floating_point() else online.state_dict()[k]), k  # counters copied
    lut.ema_update(target, online, 0.75)
    for k, v in target.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.75 * before[k] + 0.25 * online.state_dict()[k], atol=1e-6), k
        else:
            assert v.item() == 3, k  # num_batches_tracked is copied
    lut.ema_update(target, online, 0.0)
    for k, v in target.state_dict().items():
        assert torch.equal(v, online.state_dict()[k]), k


def test_momentum_branch_follows_encoder_and_head_only():
    m = tiny_model()
    mom = lut.Momentum(m)
    assert set(k.split('.')[0] for k in mom.state_dict()) == {'encoder', 'head'}
    assert not any(p.requires_grad for p in mom.parameters())
    mom.train()
    assert not mom.training and not mom.head[1].training  # stays in eval mode: BN on running statistics
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    lut.ema_update(mom, lut.tracked(m), 0.0)
    for k, v in mom.state_dict().items():
        assert torch.equal(v, lut.tracked(m).state_dict()[k]), k


def test_momentum_schedule():
    assert lut.momentum_at(0, 0.996, 1000) == 0.996
    assert abs(lut.momentum_at(500, 0.996, 1000) - 0.998) < 1e-12  # halfway: (1 + 0.996) / 2
    assert lut.momentum_at(1000, 0.996, 1000) == 1.0
    last = lut.momentum_at(999, 0.996, 1000)
    assert abs(last - (1 - 0.004 * 0.5 * (1 + math.cos(math.pi * 0.999)))) < 1e-15 and 0.99999 < last < 1.0
    ms = [lut.momentum_at(s, 0.996, 1000) for s in range(1001)]
    assert all(x <= y for x, y in zip(ms, ms[1:]))

# -----------------------------------------------------------------------------
# loss


def test_bc_loss_hand_computed():
    q1, z2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])  # orthogonal: d = 2
    q2, z1 = torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]])  # 45 degrees: d = 2 - sqrt(2)
    expected = 0.5 * (2.0 + (2.0 - math.sqrt(2.0)))
    assert abs(lut.bc_loss(q1, q2, z1, z2).item() - expected) < 1e-6
    # cross-view only: q1 is compared with z2, never with z1 (q1 has z1's direction and would give 0)
    assert abs(lut.bc_loss(q1, q2, q1 * 5, z2).item() - 0.5 * (2.0 + 2.0 - math.sqrt(2.0))) < 1e-6
    # batch mean of per-sample distances; opposite directions give 4
    qa, za = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[-1.0, 0.0], [0.0, 2.0]])
    assert abs(lut.bc_distance(qa, za).mean().item() - 2.0) < 1e-6


def test_bc_loss_zero_for_identical_directions():
    q1, q2 = torch.tensor([[3.0, 4.0], [-1.0, 2.0]]), torch.tensor([[0.5, -0.5], [2.0, 2.0]])
    assert lut.bc_loss(q1, q2, 7 * q2, 0.25 * q1).abs().item() < 1e-6


def test_target_branch_receives_no_gradient():
    torch.manual_seed(0)
    m = tiny_model()
    mom = lut.Momentum(m)
    v1, v2, noise = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    loss_mae, q1, q2, _, _ = m(v1, v2, noise, 0.75, True)
    z1, z2 = mom(v1), mom(v2)
    assert not z1.requires_grad and not z2.requires_grad
    lut.bc_loss(q1, q2, z1, z2).backward()
    assert all(p.grad is None for p in mom.parameters())
    for name in ('predictor.0.weight', 'head.0.weight', 'encoder.blocks.0.attn.qkv.weight'):  # L_BC trains these
        assert m.get_parameter(name).grad.abs().sum() > 0, name
    assert m.decoder_pred.weight.grad is None  # L_BC does not reach the decoder


def test_global_batchnorm_one_process_is_batchnorm():
    torch.manual_seed(0)
    bn = lut.GlobalBatchNorm1d(3)
    x = torch.randn(6, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([10.0, -3.0, 0.0])
    y = bn(x)
    mean, var_b, var_u = x.mean(0), x.var(0, unbiased=False), x.var(0, unbiased=True)
    assert torch.allclose(y, (x - mean) / torch.sqrt(var_b + 1e-5), atol=1e-5)
    assert torch.allclose(bn.running_mean, 0.1 * mean, atol=1e-6)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * var_u, atol=1e-5) and bn.num_batches_tracked.item() == 1
    bn.eval()
    assert torch.allclose(bn(x), (x - bn.running_mean) / torch.sqrt(bn.running_var + 1e-5), atol=1e-5)

# -----------------------------------------------------------------------------
# training runs


@pytest.fixture(scope='module')
def two_steps(tmp_path_factory):
    """One process, batch 8, 2 steps: the reference for resume and for DDP."""
    return run(tmp_path_factory.mktemp('lut') / 'single', '--batch_size', '8', '--max_steps', '2', *FAST)


def test_short_run_lowers_both_losses_and_writes_outputs(tmp_path):
    out = run(tmp_path / 'a', '--batch_size', '8', '--max_steps', '12', '--lr', '2e-3', '--warmup_epochs', '1e-9')
    log = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    assert len(log) == 12 and all(abs(r['loss'] - (r['loss_mae'] + 1.0 * r['loss_bc'])) < 1e-4 for r in log)
    for key in ('loss_mae', 'loss_bc'):
        first, last = sum(r[key] for r in log[:3]) / 3, sum(r[key] for r in log[-3:]) / 3
        assert last < 0.9 * first, (key, first, last)
    assert log[0]['momentum'] == 0.996 and all(0.996 <= r['momentum'] < 1 for r in log)
    assert os.path.getsize(os.path.join(out, 'recon.png')) > 1000
    ck = load_ckpt(out)
    assert ck['method'] == 'lut' and ck['step'] == 12 and ck['config']['w_bc'] == 1.0
    enc = vit.vit('tiny', img_size=32, patch_size=8, num_classes=0)
    enc.load_state_dict(ck['encoder'], strict=True)  # `encoder` is the online backbone as a plain ViT
    assert torch.equal(ck['encoder']['blocks.0.attn.qkv.weight'], ck['model']['encoder.blocks.0.attn.qkv.weight'])
    mom = ck['teacher']
    assert {k.split('.')[0] for k in mom} == {'encoder', 'head'}
    diff = (mom['encoder.blocks.0.attn.qkv.weight'] - ck['model']['encoder.blocks.0.attn.qkv.weight']).abs().max()
    assert 0 < diff < 0.05  # the momentum encoder lags the online one


def test_resume_restores_momentum_bit_exactly(tmp_path, two_steps):
    straight = run(tmp_path / 'straight', '--batch_size', '8', '--max_steps', '4', *FAST)
    split = str(tmp_path / 'split')
    shutil.copytree(two_steps, split)
    run(split, '--batch_size', '8', '--max_steps', '4', '--resume', 'auto', *FAST)
    a, b = load_ckpt(straight), load_ckpt(split)
    assert b['step'] == 4
    for part in ('teacher', 'model'):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert torch.equal(a['optimizer']['state'][0]['exp_avg'], b['optimizer']['state'][0]['exp_avg'])


def test_ddp_two_processes_equal_one_process(tmp_path, two_steps):
    """2 gloo processes x batch 4 == 1 process x batch 8. This needs the head/predictor BN statistics taken over the
    global batch: with per-process BN, ~88% of the parameters differ by > 1e-4 after 2 steps, the gradient norm by
    ~65% and the BN running statistics by ~0.2-0.5."""
    out = str(tmp_path / 'ddp')
    run_torchrun('lut.py', TINY + FAST + ['--batch_size', '4', '--max_steps', '2', '--device', 'cpu',
                                          '--out_dir', out])
    single, ddp = load_ckpt(two_steps), load_ckpt(out)
    log_s = [json.loads(line) for line in open(os.path.join(two_steps, 'log.jsonl'))]
    log_d = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    assert len(log_s) == len(log_d) == 2
    for rs, rd in zip(log_s, log_d):  # step 1: gradient of the initial model; step 2: after one update
        for key in ('loss_mae', 'loss_bc', 'grad_norm'):
            assert abs(rs[key] - rd[key]) <= 1e-5 * abs(rs[key]), (key, rs[key], rd[key])
    for part in ('model', 'teacher'):
        far = total = 0
        for k, a in single[part].items():
            b = ddp[part][k]
            if k.endswith(('running_mean', 'running_var', 'num_batches_tracked')):
                assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-5), (part, k)
            else:
                far += int(((a - b).abs() > 1e-4).sum())  # lr is 1e-3
                total += a.numel()
        # Adam turns round-off in gradients that are zero in exact arithmetic (the key bias: softmax ignores a
        # per-query constant) into steps of ~lr, so a few elements of millions may differ; anything else may not
        assert far <= 1e-5 * total, (part, far, total)


def test_folder_regime_is_the_official_micro_batch_and_accumulation(capsys):
    """docs/PRETRAIN.md: 128 images per GPU with --accum_iter 4 on 8 GPUs (effective 4096). BatchNorm in the head and
    predictor normalises over one micro-batch, so the micro-batch (not only the effective batch) is the recipe."""
    cfg = lut.get_config(['--data', os.path.dirname(__file__)])
    assert (cfg.batch_size, cfg.accum_iter) == (128, 4)
    assert cfg.batch_size * cfg.accum_iter * 8 == 4096
    assert cfg.blr * math.sqrt(cfg.batch_size * cfg.accum_iter * 8) / 4 == pytest.approx(2.4e-3)  # main()'s rule
    assert lut.get_config([]).accum_iter == lut.get_config(['--data', 'fashion-mnist']).accum_iter == 1
    explicit = lut.get_config(['--data', os.path.dirname(__file__), '--accum_iter', '1', '--batch_size', '512'])
    assert (explicit.batch_size, explicit.accum_iter) == (512, 1)
    with pytest.raises(SystemExit):
        lut.get_config(['--accum_iter', '-1'])
    assert '--accum_iter' in capsys.readouterr().err
