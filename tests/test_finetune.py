"""finetune.py: RandAugment and random erasing as timm's, layer-decay groups, kNN vote, linear probe, checkpoint
formats, position embeddings, distributed counting, end-to-end fine-tuning / probing / kNN, resume, and bad input."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

import data
import finetune
import mae
import vit
from conftest import load_ckpt, run_torchrun

TINY = ['--img_size', '32', '--patch_size', '8', '--num_workers', '0', '--log_every', '2']


def small_vit(**kw):
    return vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=3, num_heads=2, **kw)


def results(out):
    with open(os.path.join(out, 'results.json')) as f:
        return json.load(f)

# -----------------------------------------------------------------------------
# recipe: timm's rand-m9-mstd0.5-inc1 and random erasing in 'pixel' mode


def test_randaugment_magnitudes_are_timms():
    # timm auto_augment.py, _LEVEL_DENOM = 10: rotate 30 m/10 deg, shear 0.3 m/10, translate 0.45 m/10 of the side,
    # posterize keeps 4 - int(4 m/10) bits, solarize threshold 256 - int(256 m/10), solarize-add int(110 m/10),
    # enhance factors 1 +- 0.9 m/10 (floor 0.1). At m9: rotate 27 deg, shear 0.27, translate 0.405, 1 bit, 26, 99.
    official_m9 = {'Rotate': 27.0, 'ShearX': 0.27, 'ShearY': 0.27, 'TranslateXRel': 0.405, 'TranslateYRel': 0.405,
                   'PosterizeIncreasing': 1, 'SolarizeIncreasing': 26, 'SolarizeAdd': 99, 'ColorIncreasing': 0.81,
                   'ContrastIncreasing': 0.81, 'BrightnessIncreasing': 0.81, 'SharpnessIncreasing': 0.81,
                   'AutoContrast': None, 'Equalize': None, 'Invert': None}
    assert set(finetune.RA_OPS) == set(official_m9) and len(finetune.RA_OPS) == 15  # _RAND_INCREASING_TRANSFORMS
    for name, want in official_m9.items():
        assert finetune.ra_level(name, 9) == (pytest.approx(want) if want is not None else None), name
    assert finetune.ra_level('Rotate', 10) == 30.0 and finetune.ra_level('PosterizeIncreasing', 10) == 0
    assert finetune.ra_level('SolarizeIncreasing', 0) == 256 and finetune.ra_level('PosterizeIncreasing', 0) == 4
    # torchvision's RandAugment(2, 9) with 31 bins, for contrast, is 3x weaker: rotate 9 deg, shear 0.09
    assert finetune.ra_level('Rotate', 9) == pytest.approx(3 * 9.0)


def test_randaugment_ops_match_the_pil_calls_of_timm():
    rng = np.random.RandomState(0)
    img = Image.fromarray(rng.randint(0, 256, (24, 32, 3), dtype=np.uint8))
    fill = (124, 116, 104)  # timm img_mean: round(255 * ImageNet mean)
    a = lambda im: np.asarray(im).astype(int)
    for s in (0.27, -0.27):  # timm shear_x / shear_y: PIL affine about the top-left corner
        for name, coeffs in (('ShearX', (1, s, 0, 0, 1, 0)), ('ShearY', (1, 0, 0, s, 1, 0))):
            ref = img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BICUBIC, fillcolor=fill)
            got = [finetune.ra_apply(img, name, lv) for lv in (s, -s)]  # the sign convention may differ: one of them
            assert min(np.abs(a(g) - a(ref)).max() for g in got) == 0, (name, s)
    ref = img.rotate(27.0, resample=Image.BICUBIC, fillcolor=fill)
    assert np.abs(a(finetune.ra_apply(img, 'Rotate', 27.0)) - a(ref)).max() == 0
    ref = img.transform(img.size, Image.AFFINE, (1, 0, -0.405 * 32, 0, 1, 0), resample=Image.BICUBIC, fillcolor=fill)
    assert np.abs(a(finetune.ra_apply(img, 'TranslateXRel', 0.405)) - a(ref)).max() <= 1  # 13 px of 32, sub-pixel part
    x = a(img)
    assert np.array_equal(a(finetune.ra_apply(img, 'SolarizeAdd', 99)), np.where(x < 128, np.minimum(x + 99, 255), x))
    assert np.array_equal(a(finetune.ra_apply(img, 'PosterizeIncreasing', 1)), x & 0x80)
    assert np.array_equal(a(finetune.ra_apply(img, 'SolarizeIncreasing', 26)), np.where(x >= 26, 255 - x, x))
    assert np.array_equal(a(finetune.ra_apply(img, 'BrightnessIncreasing', -0.81)),
                          a(ImageEnhance.Brightness(img).enhance(0.19)))
    assert np.array_equal(a(finetune.ra_apply(img, 'ContrastIncreasing', -0.95)),
                          a(ImageEnhance.Contrast(img).enhance(0.1)))  # factor floored at 0.1


def test_randaugment_draws_two_ops_each_with_p_half_and_noisy_magnitude(monkeypatch):
    calls = []
    monkeypatch.setattr(finetune, 'ra_apply', lambda im, name, level: calls.append((name, level)) or im)
    ra, img = finetune.RandAugment(2, 9), torch.zeros(3, 8, 8, dtype=torch.uint8)
    torch.manual_seed(0)
    n = 6000
    for _ in range(n):
        ra(img)
    assert abs(len(calls) / (2 * n) - 0.5) < 0.02  # each of the 2 ops applied with probability 0.5
    rot = torch.tensor([lv for name, lv in calls if name == 'Rotate'])
    assert 0.4 < (rot > 0).float().mean() < 0.6  # random sign
    mag = rot.abs() / 3.0  # back to magnitude units: N(9, 0.5) clipped to [0, 10]
    assert abs(mag.mean() - 9.0) < 0.1 and abs(mag.std() - 0.5) < 0.08 and mag.max() <= 10.0
    assert {name for name, _ in calls} == set(finetune.RA_OPS)


def test_random_erasing_fills_pixel_noise():
    # timm RandomErasing(mode='pixel') as the official fine-tuning uses: N(0, 1) per pixel and channel, not zeros
    tf = finetune.finetune_transform(32, rand_augment=None, reprob=1.0)
    torch.manual_seed(0)
    erase = tf.transforms[-1]
    x = torch.full((3, 32, 32), 7.0)
    out = erase(x)
    box = out != 7.0
    assert box.any() and box.float().mean() <= 1 / 3 + 1e-6
    vals = out[box]
    assert abs(vals.mean()) < 0.3 and 0.7 < vals.std() < 1.3  # normal noise in normalized units
    assert torch.equal(box[0], box[1]) and torch.equal(box[0], box[2])  # one box across the channels

# -----------------------------------------------------------------------------
# pure functions


def test_layer_decay_groups_scales_membership_and_weight_decay():
    m = small_vit(num_classes=5, global_pool='avg')
    m.pos_embed.requires_grad_(True)
    groups = finetune.param_groups(m, weight_decay=0.05, layer_decay=0.5)
    where = {n: g for g in groups for n in g['names']}
    assert sorted(where) == sorted(n for n, _ in m.named_parameters())  # every parameter exactly once
    # depth 3: layer 0 = embeddings (0.5^4), block i = layer i + 1 (0.5^(3 - i)), head / fc_norm = layer 4 (1.0)
    expect = {'cls_token': (0.0625, 0.0), 'pos_embed': (0.0625, 0.0), 'patch_embed.proj.weight': (0.0625, 0.05),
              'patch_embed.proj.bias': (0.0625, 0.0), 'blocks.0.attn.qkv.weight': (0.125, 0.05),
              'blocks.0.norm1.weight': (0.125, 0.0), 'blocks.1.mlp.fc1.weight': (0.25, 0.05),
              'blocks.1.mlp.fc1.bias': (0.25, 0.0), 'blocks.2.attn.proj.weight': (0.5, 0.05),
              'blocks.2.norm2.bias': (0.5, 0.0), 'fc_norm.weight': (1.0, 0.0), 'head.weight': (1.0, 0.05),
              'head.bias': (1.0, 0.0)}
    for n, (scale, wd) in expect.items():
        assert where[n]['lr_scale'] == pytest.approx(scale) and where[n]['weight_decay'] == wd, n
    assert len(groups) == 2 * 5  # (decay, no decay) x 5 layers
    m.pos_embed.requires_grad_(False)  # frozen parameters are left out
    assert 'pos_embed' not in [n for g in finetune.param_groups(m, 0.05, 0.5) for n in g['names']]


def test_knn_vote_hand_computed():
    # unit train vectors at angles 0, 10, 90, 100 degrees: classes 0, 0, 1, 1
    ang = torch.tensor([0.0, 10.0, 90.0, 100.0]).deg2rad()
    train = torch.stack([ang.cos(), ang.sin()], 1)
    labels = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # at 0 and 90 degrees
    s = data.knn_scores(train, labels, test, 2, k=2, t=0.5)
    c10 = torch.tensor(10.0).deg2rad().cos()
    # test 0: neighbours 0 deg (sim 1) and 10 deg (sim cos 10), both class 0
    assert torch.allclose(s[0], torch.stack([torch.exp(torch.tensor(2.0)) + torch.exp(c10 / 0.5), torch.tensor(0.0)]))
    assert s.argmax(1).tolist() == [0, 1]
    counts = data.knn_counts(3 * train, labels, 5 * test, torch.tensor([0, 0]), 2, k=2, t=0.5, chunk=1)
    assert counts.tolist() == [1.0, 2.0, 2.0]  # features are normalised inside; top-5 of 2 classes always hits
    # weighting beats counting: one class-0 neighbour at sim 1.0 vs two class-1 neighbours at sim 0.9
    train = torch.tensor([[1.0, 0.0], [0.9, 0.19 ** 0.5], [0.9, -(0.19 ** 0.5)]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    sharp = data.knn_scores(train, labels, q, 2, k=3, t=0.07)  # e^(1/.07) > 2 e^(.9/.07)
    flat = data.knn_scores(train, labels, q, 2, k=3, t=1.0)  # e^1 < 2 e^.9
    assert sharp.argmax().item() == 0 and flat.argmax().item() == 1
    assert torch.allclose(flat[0], torch.tensor([torch.e, 2 * torch.exp(torch.tensor(0.9))]), rtol=1e-5)


def test_count_correct_top1_top5():
    scores = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6], [6.0, 5, 4, 3, 2, 1, 0], [0.0, 1, 9, 8, 7, 2, 0.5]])
    y = torch.tensor([6, 5, 4])  # top-1 hit; rank 6 (miss); rank 3 (top-5 hit)
    c = data.count_correct(scores, y)
    assert c.tolist() == [1.0, 2.0, 3.0]


def test_smoothing_and_soft_cross_entropy():
    t = finetune.smooth_targets(torch.tensor([2, 0]), 4, 0.1)
    assert torch.allclose(t[0], torch.tensor([0.025, 0.025, 0.925, 0.025])) and torch.allclose(t.sum(1), torch.ones(2))
    logits = torch.randn(2, 4)
    hard = finetune.smooth_targets(torch.tensor([2, 0]), 4, 0.0)
    assert torch.allclose(finetune.soft_target_ce(logits, hard), F.cross_entropy(logits, torch.tensor([2, 0])))
    mixer = finetune.batch_mixer(0.8, 1.0, 4)
    x, soft = mixer(torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert soft.shape == (6, 4) and torch.allclose(soft.sum(1), torch.ones(6)) and finetune.batch_mixer(0, 0, 4) is None


def test_lars_trust_ratio_step():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = finetune.LARS([{'params': [w, b]}], lr=2.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001)
    w.grad, b.grad = torch.tensor([[0.0, 10.0]]), torch.tensor([0.5])
    opt.step()
    # weight: update rescaled to norm trust * |w| = 0.005 along the gradient, times lr 2; bias: plain lr * g
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0 - 2 * 0.005]]))
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 2 * 0.5]))


def test_linear_probe_separates_a_linearly_separable_set():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(3, 16) * 8.0
    y = torch.arange(300) % 3
    feats = centers[y] + torch.randn(300, 16, generator=g)  # well-separated blobs; margin checked below
    w_true = centers.T  # the class centres already separate every point
    assert ((feats @ w_true).argmax(1) == y).all()
    torch.manual_seed(0)
    probe = finetune.Probe(None, 16, 3, 'cls')
    opt = finetune.LARS(finetune.param_groups(probe, 0.0), lr=0.0)
    for step in range(300):
        for gr in opt.param_groups:
            gr['lr'] = finetune.lr_at(step, 5.0, 0.0, 30, 300) * gr['lr_scale']
        i = torch.randint(0, 300, (64,), generator=g)
        loss = finetune.soft_target_ce(probe(feats[i]), finetune.smooth_targets(y[i], 3, 0.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe.eval()
    assert (probe(feats).argmax(1) == y).float().mean().item() == 1.0


def test_gather_rows_single_process_and_subset():
    x = torch.arange(10).float()[:, None]
    assert data.gather_rows(x, 10, 1) is x
    ds = list(range(100))
    s = data.subset(ds, 30)
    assert len(s) == 30 and list(s) == sorted(set(s)) and data.subset(ds, 0) is ds

# -----------------------------------------------------------------------------
# checkpoint formats and position embeddings


def test_every_method_and_official_format_loads(tmp_path):
    torch.manual_seed(0)
    src = small_vit(num_classes=0)
    sd = vit.backbone_state_dict(src)
    x = torch.randn(2, 3, 16, 16)
    ref = src.forward_features(x)
    files = {f'nanomim_{m}': {'method': m, 'model': {'anything': torch.zeros(1)}, 'encoder': sd}
             for m in ('mae', 'lut', 'ibot', 'dtm', 'finetune')}
    files.update({
        'mae_module': {'model': {**{'encoder.' + k: v for k, v in sd.items()}, 'mask_token': torch.zeros(1, 1, 8),
                                 'decoder_embed.weight': torch.zeros(8, 16)}},  # mae.MAE().state_dict() layout
        'official_mae': {'model': {**sd, 'mask_token': torch.zeros(1, 1, 16), 'decoder_embed.weight': torch.zeros(3),
                                   'decoder_pos_embed': torch.zeros(1, 5, 8), 'decoder_norm.weight': torch.zeros(3)}},
        'official_lut': {'model': {**sd, 'head.0.weight': torch.zeros(4, 16), 'predictor.0.weight': torch.zeros(4)},
                         'model_ema': {k: v + 1 for k, v in sd.items()}, 'epoch': 3},
        'official_ibot': {'teacher': {**{'backbone.' + k: v for k, v in sd.items()}, 'head.mlp.0.weight': torch.zeros(2)},
                          'student': {'module.backbone.' + k: v + 1 for k, v in sd.items()}},
        'bare': sd,
    })
    for name, obj in files.items():
        path = str(tmp_path / f'{name}.pt')
        torch.save(obj, path)
        dst, arch = vit.load_vit(path, num_heads=2, num_classes=0, verbose=False)  # width 16: heads not in SIZES
        assert not arch['layer_scale'] and (arch['embed_dim'], arch['depth'], arch['patch_size']) == (16, 3, 8)
        assert arch['missing'] == [] and arch['unexpected'] == [], name
        assert torch.allclose(dst.forward_features(x), ref, atol=1e-5), name
    # --checkpoint_key picks another sub-dict: LUT's EMA teacher, iBOT's student (DDP prefix stripped)
    for name, key in (('official_lut', 'model_ema'), ('official_ibot', 'student')):
        dst, _ = vit.load_vit(str(tmp_path / f'{name}.pt'), key, num_heads=2, num_classes=0, verbose=False)
        assert torch.equal(dst.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight + 1), name
    with pytest.raises(ValueError, match="no key 'nope'"):
        vit.load_vit(str(tmp_path / 'bare.pt'), 'nope', num_heads=2)


def test_beit_dtm_layout_with_layer_scale_and_relative_position(tmp_path):
    torch.manual_seed(0)
    src = small_vit(num_classes=0, layer_scale=0.1, pos_embed='learned')
    with torch.no_grad():
        for blk in src.blocks:
            blk.ls1.gamma.uniform_(0.5, 1.5)
            blk.attn.qkv.bias[16:32] = 0.0  # BEiT has q and v biases only
    beit = {}
    for k, v in vit.backbone_state_dict(src).items():
        if k.endswith('attn.qkv.bias'):
            beit[k.replace('qkv.bias', 'q_bias')], beit[k.replace('qkv.bias', 'v_bias')] = v[:16], v[32:]
        else:
            beit[k.replace('ls1.gamma', 'gamma_1').replace('ls2.gamma', 'gamma_2')] = v
    beit['blocks.0.attn.relative_position_bias_table'] = torch.zeros(9, 2)
    beit['rel_pos_bias.relative_position_index'] = torch.zeros(5, 5, dtype=torch.long)
    beit['lm_head.weight'] = torch.zeros(512, 16)
    path = str(tmp_path / 'dtm.pt')
    torch.save({'model': beit}, path)
    dst, arch = vit.load_vit(path, num_heads=2, num_classes=0, verbose=False)
    assert arch['layer_scale'] and isinstance(dst.blocks[0].ls1, vit.LayerScale)  # built with layer scale
    assert arch['missing'] == [] and arch['unexpected'] == []
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(dst.forward_features(x), src.forward_features(x), atol=1e-5)
    assert 'relative position bias dropped' in arch['format']


def test_position_embedding_interpolation():
    pe = torch.randn(1, 1 + 16, 8)
    assert vit.interpolate_pos_embed(pe, (4, 4)) is pe  # same grid: untouched
    const = torch.cat([torch.randn(1, 1, 8), torch.full((1, 16, 8), 0.7)], 1)
    up = vit.interpolate_pos_embed(const, (6, 6))  # a constant field stays constant; [CLS] row kept
    assert up.shape == (1, 37, 8) and torch.allclose(up[:, 1:], torch.full((1, 36, 8), 0.7), atol=1e-6)
    assert torch.equal(up[:, :1], const[:, :1])
    # a checkpoint at 16 px (2 x 2 grid) into a 32 px model (4 x 4), and a pos_embed without a [CLS] row
    src = vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=0)
    sd = vit.backbone_state_dict(src)
    dst = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=0)
    flat = torch.cat([sd['pos_embed'][:, :1], torch.full((1, 4, 16), -0.3)], 1)
    vit.load_backbone({'encoder': {**sd, 'pos_embed': flat}}, dst, verbose=False)
    assert torch.equal(dst.pos_embed[:, 0], sd['pos_embed'][:, 0])
    assert torch.allclose(dst.pos_embed[:, 1:], torch.full((1, 16, 16), -0.3), atol=1e-6)
    same = vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=0)
    vit.load_backbone({'encoder': {**sd, 'pos_embed': sd['pos_embed'][:, 1:] + 1}}, same, verbose=False)
    assert torch.equal(same.pos_embed[:, 0], torch.zeros(1, 16))
    assert torch.equal(same.pos_embed[:, 1:], sd['pos_embed'][:, 1:] + 1)
    with pytest.raises(ValueError, match='shapes differ.*blocks.0.mlp.fc1.weight'):
        bad = {**sd, 'blocks.0.mlp.fc1.weight': torch.zeros(32, 16)}
        vit.load_backbone({'encoder': bad}, same, verbose=False)

# -----------------------------------------------------------------------------
# end to end


def test_finetune_end_to_end_then_knn_on_its_checkpoint(tmp_path):
    # a real mae.py checkpoint, fine-tuned with EMA, then its `encoder` read back by kNN
    pre = str(tmp_path / 'mae')
    mae.main(['--img_size', '32', '--patch_size', '8', '--decoder_dim', '32', '--decoder_depth', '1',
              '--decoder_heads', '2', '--num_workers', '0', '--batch_size', '8', '--max_steps', '1', '--out_dir', pre])
    out = str(tmp_path / 'ft')
    finetune.main(TINY + ['--checkpoint', os.path.join(pre, 'checkpoint.pt'), '--batch_size', '8', '--max_steps', '4',
                          '--train_samples', '64', '--eval_samples', '21', '--ema', '0.9', '--out_dir', out])
    ck = load_ckpt(out)
    assert ck['method'] == 'finetune' and ck['step'] == 4 and {'model', 'optimizer', 'scaler', 'encoder', 'ema'} <= set(ck)
    assert not any(k.startswith(('head.', 'fc_norm.')) for k in ck['encoder'])
    names = [n for g in ck['optimizer']['param_groups'] for n in g['names']]
    assert 'pos_embed' in names and 'head.weight' in names  # the position embedding is fine-tuned too
    r = results(out)
    assert r['n'] == 21 and 0 <= r['last_acc1'] <= r['best_acc1'] <= 100 and 'last_ema_acc1' in r
    knn = str(tmp_path / 'knn')
    finetune.main(TINY + ['--mode', 'knn', '--checkpoint', os.path.join(out, 'checkpoint.pt'), '--pool', 'avg',
                          '--train_samples', '40', '--eval_samples', '13', '--out_dir', knn])
    r = results(knn)
    assert r['n'] == 13 and r['n_train'] == 40 and r['acc1'] <= r['acc5']


def test_finetune_resume_equals_uninterrupted(tmp_path):
    common = TINY + ['--checkpoint', 'none', '--batch_size', '8', '--train_samples', '32', '--eval_samples', '8',
                     '--epochs', '2']
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    finetune.main(common + ['--max_steps', '5', '--out_dir', a])  # crosses the epoch end (4 steps) and its eval
    finetune.main(common + ['--max_steps', '3', '--out_dir', b])
    finetune.main(common + ['--max_steps', '5', '--out_dir', b, '--resume', 'auto'])
    ma, mb = load_ckpt(a)['model'], load_ckpt(b)['model']
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert results(a)['last_acc1'] == results(b)['last_acc1']


def test_linprobe_cached_and_streamed(tmp_path):
    out = str(tmp_path / 'lp')
    finetune.main(TINY + ['--mode', 'linprobe', '--checkpoint', 'none', '--train_samples', '60', '--eval_samples', '11',
                          '--batch_size', '16', '--epochs', '3', '--out_dir', out])
    ck = load_ckpt(out)
    assert sorted(ck['model']) == ['head.0.num_batches_tracked', 'head.0.running_mean', 'head.0.running_var',
                                   'head.1.bias', 'head.1.weight']  # BN without affine + linear, nothing else trains
    r = results(out)
    assert ck['step'] == 9 and r['n'] == 11 and 0 <= r['knn_acc1'] <= r['knn_acc5'] <= 100  # kNN of the cached features
    torch.manual_seed(0)
    ref = vit.backbone_state_dict(vit.vit('tiny', img_size=32, patch_size=8, num_classes=0))
    assert all(torch.equal(ck['encoder'][k], ref[k]) for k in ref)  # the backbone is the seed-0 random init, frozen
    out2 = str(tmp_path / 'lp2')
    finetune.main(TINY + ['--mode', 'linprobe', '--checkpoint', 'none', '--cache', '0', '--train_samples', '32',
                          '--eval_samples', '5', '--batch_size', '16', '--max_steps', '2', '--out_dir', out2])
    ck2 = load_ckpt(out2)
    assert all(torch.equal(ck2['model']['backbone.' + k], ref[k]) for k in ref)
    assert results(out2)['n'] == 5


def test_raw_pixel_knn_matches_a_brute_force_vote(tmp_path):
    # --checkpoint pixels: features are the eval-transformed images flattened; recount the k=5 vote by hand
    import data
    out = str(tmp_path / 'pix')
    finetune.main(TINY + ['--mode', 'knn', '--checkpoint', 'pixels', '--train_samples', '40', '--eval_samples', '12',
                          '--knn_k', '5', '--out_dir', out])
    tf = data.eval_transform(32)
    def feats(split, n):
        ds = data.subset(data.build_dataset('', split, 32), n)
        x = torch.stack([tf(ds[i][0]).flatten() for i in range(len(ds))])
        return F.normalize(x, dim=1), [int(ds[i][1]) for i in range(len(ds))]
    (ftr, ytr), (fte, yte) = feats('train', 40), feats('val', 12)
    correct = 0
    for q, y in zip(fte, yte):
        sims = [(float(q @ f), c) for f, c in zip(ftr, ytr)]
        votes = {}
        for s, c in sorted(sims, reverse=True)[:5]:
            votes[c] = votes.get(c, 0.0) + torch.tensor(s / 0.07).exp().item()
        correct += max(votes, key=votes.get) == y
    r = results(out)
    assert r['n'] == 12 and r['acc1'] == pytest.approx(100 * correct / 12)
    with pytest.raises(SystemExit):  # fine-tuning raw pixels makes no sense: refused by argparse
        finetune.get_config(['--mode', 'finetune', '--checkpoint', 'pixels'])


def test_distributed_knn_and_eval_count_each_sample_once(tmp_path):
    # 2 gloo ranks, 33 val images: ranks hold 17 and 16, the counts must sum to 33 and match one process
    args = TINY + ['--mode', 'knn', '--checkpoint', 'none', '--train_samples', '41', '--eval_samples', '33',
                   '--batch_size', '8']
    run_torchrun('finetune.py', args + ['--out_dir', str(tmp_path / 'ddp')])
    finetune.main(args + ['--out_dir', str(tmp_path / 'one')])
    ddp, one = results(str(tmp_path / 'ddp')), results(str(tmp_path / 'one'))
    assert ddp['n'] == one['n'] == 33
    assert ddp['acc1'] == pytest.approx(one['acc1']) and ddp['acc5'] == pytest.approx(one['acc5'])
    # linear probe on cached features with 2 ranks: 2 steps of training, then all 33 images evaluated once
    run_torchrun('finetune.py', TINY + ['--mode', 'linprobe', '--checkpoint', 'none', '--train_samples', '32',
                                        '--eval_samples', '33', '--batch_size', '8', '--max_steps', '2',
                                        '--out_dir', str(tmp_path / 'lp')])
    assert results(str(tmp_path / 'lp'))['n'] == 33


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    pre = tmp_path / 'tiny.pt'
    torch.save({'encoder': vit.backbone_state_dict(vit.vit('tiny', img_size=32, patch_size=8, num_classes=0))}, pre)
    with pytest.raises(SystemExit) as e:  # wrong model size
        finetune.main(TINY + ['--model', 'small', '--checkpoint', str(pre), '--out_dir', str(tmp_path / 'x')])
    assert str(e.value.code).startswith('error: checkpoint backbone is width 192') and '\n' not in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        finetune.main(TINY + ['--checkpoint', str(tmp_path / 'missing.pt'), '--out_dir', str(tmp_path / 'x')])
    assert str(e.value.code) == f'error: checkpoint {tmp_path / "missing.pt"} does not exist'
    for argv, msg in ((['--mode', 'knn'], '--checkpoint is required'),  # argparse errors: exit 2, one line
                      (['--checkpoint', 'none', '--pool', 'max'], '--pool must be avg or cls'),
                      (['--checkpoint', 'none', '--mode', 'probe'], '--mode must be one of')):
        with pytest.raises(SystemExit) as e:
            finetune.get_config(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_knn_feature_extraction_prints_progress(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('NANOMIM_PROGRESS_EVERY', '0')  # a line at every batch instead of every 10 s
    finetune.main(TINY + ['--mode', 'knn', '--checkpoint', 'none', '--train_samples', '24', '--eval_samples', '8',
                          '--batch_size', '8', '--out_dir', str(tmp_path / 'knn')])
    out = capsys.readouterr().out
    assert 'train features: 8/24 img' in out and 'train features: 24/24 img' in out and 'val features: 8/8' in out
    monkeypatch.setenv('NANOMIM_PROGRESS_EVERY', '1000')  # the default cadence: a run this short prints no line
    finetune.main(TINY + ['--mode', 'knn', '--checkpoint', 'none', '--train_samples', '24', '--eval_samples', '8',
                          '--batch_size', '8', '--out_dir', str(tmp_path / 'knn2')])
    assert 'features: 8/24' not in capsys.readouterr().out


def test_ibot_protocol_features_and_probe(tmp_path):
    # iBOT eval_linear: ViT-S and smaller concatenate the normed [CLS] of the last 4 blocks (n_last_blocks 4);
    # ViT-B and larger take the normed [CLS] and the mean normed patch token of the last block (avgpool 2)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    for width, heads, n in ((64, 2, 4), (768, 12, 1)):
        m = vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=width, depth=5, num_heads=heads,
                                  num_classes=0).eval()
        t, outs = m.with_cls(m.embed(x)), []
        for blk in m.blocks:
            t = blk(t)
            outs.append(m.norm(t))
        want = torch.cat([o[:, 0] for o in outs[-4:]], -1) if n == 4 else torch.cat([outs[-1][:, 0],
                                                                                      outs[-1][:, 1:].mean(1)], -1)
        with torch.no_grad():
            got = finetune.probe_features(m, x, 'cls', 'ibot')
        assert got.shape == (2, finetune.probe_dim(m, 'ibot')) and torch.allclose(got, want, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(finetune.probe_features(m, x, 'cls', 'mae'), outs[-1][:, 0])
    cfg = finetune.get_config(['--mode', 'linprobe', '--protocol', 'ibot', '--checkpoint', 'none', '--data', 'x'])
    assert (cfg.epochs, cfg.batch_size, cfg.blr, cfg.warmup_epochs, cfg.weight_decay, cfg.min_lr) == \
        (100, 128, 1e-3, 0, 0.0, 0.0)  # DINO / iBOT eval_linear defaults
    out = str(tmp_path / 'ibot')
    finetune.main(TINY + ['--mode', 'linprobe', '--protocol', 'ibot', '--checkpoint', 'none', '--train_samples', '32',
                          '--eval_samples', '8', '--batch_size', '16', '--epochs', '2', '--out_dir', out])
    ck = load_ckpt(out)
    assert sorted(ck['model']) == ['head.0.bias', 'head.0.weight']  # no BatchNorm
    assert ck['model']['head.0.weight'].shape == (10, 4 * 192)
    assert ck['optimizer']['param_groups'][0]['momentum'] == 0.9 and 'knn_acc1' not in results(out)


def test_knn_says_what_it_uses_and_what_it_wrote(tmp_path, capsys):
    """The first line is the regime and what kNN uses (no training knob); fewer training images than k is said; the
    last line names results.json."""
    out = str(tmp_path / 'knn')
    finetune.main(TINY + ['--mode', 'knn', '--checkpoint', 'none', '--train_samples', '12', '--eval_samples', '5',
                          '--out_dir', out])
    lines = capsys.readouterr().out.splitlines()
    first = json.loads(lines[0])
    assert first['regime'] == 'embedded' and (first['mode'], first['knn_k'], first['train_images']) == ('knn', 20, 12)
    assert not {'epochs', 'blr', 'warmup_epochs', 'mixup', 'layer_decay', 'cache'} & set(first)
    assert any(s.startswith('kNN: 12 training images, fewer than --knn_k 20') for s in lines)
    assert lines[-1].startswith('done: kNN top-1') and lines[-1].endswith(f'wrote {out}/results.json')
    assert os.path.exists(os.path.join(out, 'results.json'))


def test_linprobe_prints_its_configuration_first_and_a_short_warmup(tmp_path, capsys):
    out = str(tmp_path / 'lp')
    finetune.main(TINY + ['--mode', 'linprobe', '--checkpoint', 'none', '--train_samples', '32', '--eval_samples', '8',
                          '--batch_size', '16', '--epochs', '2', '--out_dir', out])  # 10 warm-up epochs > 2 epochs
    lines = capsys.readouterr().out.splitlines()
    first = json.loads(lines[0])
    assert (first['mode'], first['cache'], first['protocol'], first['warmup_epochs'], first['end_step']) == \
        ('linprobe', 1, 'mae', 10, 4)
    assert not {'mixup', 'cutmix', 'rand_augment', 'reprob', 'layer_decay', 'drop_path', 'smoothing'} & set(first)
    warm = [i for i, s in enumerate(lines) if s.startswith('warning: the warm-up (--warmup_epochs 10: 20 steps)')]
    feats = [i for i, s in enumerate(lines) if s.startswith('features:')]
    assert len(warm) == 1 and warm[0] < feats[0]  # said before the features are extracted
    assert lines[-1].endswith(f'wrote {out}/checkpoint.pt, results.json, log.jsonl')
    finetune.main(TINY + ['--mode', 'finetune', '--checkpoint', 'none', '--train_samples', '32', '--eval_samples', '8',
                          '--batch_size', '16', '--epochs', '2', '--warmup_epochs', '1', '--max_steps', '1',
                          '--out_dir', str(tmp_path / 'ft')])  # warm-up 2 steps, the run 1: said
    assert 'warning: the warm-up (--warmup_epochs 1: 2 steps) is as long as this run (1 steps)' in \
        capsys.readouterr().out


def test_val_folder_missing_a_class_keeps_its_labels(tmp_path, capsys):
    """train/{a,b,c}, val/{a,c}: c must stay class 2 in val (it was 1 when each split numbered its own folders).
    Raw pixels of one colour per class: a correct labelling scores 100."""
    from PIL import Image
    colours = {'a': (255, 0, 0), 'b': (0, 255, 0), 'c': (0, 0, 255)}
    for split, classes, n in (('train', 'abc', 4), ('val', 'ac', 2)):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new('RGB', (32, 32), colours[c]).save(tmp_path / split / c / f'{i}.png')
    out = str(tmp_path / 'knn')
    finetune.main(TINY + ['--data', str(tmp_path), '--model', 'tiny', '--mode', 'knn', '--checkpoint', 'pixels',
                          '--knn_k', '3', '--out_dir', out])
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first['classes'] == 3 and first['val_lacks_classes'] == ['b']
    assert results(out)['acc1'] == 100.0
