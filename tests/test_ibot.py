"""ibot.py: masks, centering (one process and across 2 gloo ranks), L_CLS / L_MIM against hand-computed values,
the CE = entropy identity, schedules, per-tensor clipping, EMA, the frozen last layer, learning without collapse,
exact resume, the checkpoint contract and bad input."""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import data
import ibot
import vit
from conftest import load_ckpt, run_torchrun

LN2 = math.log(2)
TINY = ['--model', 'micro', '--img_size', '32', '--local_size', '16', '--patch_size', '8', '--local_crops_number', '2',
        '--out_dim', '64', '--head_hidden', '64', '--num_workers', '0', '--log_every', '1']


@pytest.fixture(autouse=True)
def micro_vit(monkeypatch):
    """Training runs use a 2-block, 64-wide ViT ('micro', added to vit.SIZES for the test only): nothing these
    tests check depends on depth, and 12-block tiny runs cost minutes of CPU on a shared 2-core machine."""
    monkeypatch.setitem(vit.SIZES, 'micro', (64, 2, 2, 8))


def run(tmp_path, name, *extra):
    out = str(tmp_path / name)
    ibot.main(TINY + ['--out_dir', out] + list(extra))
    return out


def tiny_cfg(**kw):
    cfg = dict(model='tiny', img_size=32, local_size=16, patch_size=8, local_crops_number=2, out_dim=16,
               head_hidden=32, shared_head=True, norm_last_layer=True, global_scale_min=0.25, local_scale_min=0.05,
               pred_ratio=0.3, pred_ratio_var=0.2, no_mask_prob=0.5)
    cfg.update(kw)
    return SimpleNamespace(**cfg)


# ----------------------------------------------------------------------------- recipe: crops and masks


def test_ibot_mask_no_mask_probability_and_ratio():
    rng = np.random.default_rng(0)
    draws = np.array([ibot.ibot_mask(14, 14, rng).sum() for _ in range(2000)])
    # no-mask probability 0.5: binomial std over 2000 draws is 0.011
    assert abs((draws == 0).mean() - 0.5) < 0.05
    masked = draws[draws > 0]
    assert masked.max() <= 0.5 * 196 and 40 < masked.mean() < 75  # official code: mean about 57.6


def test_masks_shapes_counts_and_no_mask_probability():
    mc = ibot.MultiCropMasks(tiny_cfg(img_size=224, patch_size=16))  # the recipe's 14 x 14 grid
    rng = np.random.default_rng(0)
    draws = np.stack([mc.masks(rng).numpy() for _ in range(400)])  # (400, 2, 14, 14)
    assert draws.dtype == bool and draws.shape[1:] == (2, 14, 14)
    counts = draws.reshape(400, 2, -1).sum(-1)  # (400, 2)
    unmasked = counts == 0
    # each global crop: no mask with p 0.5 (binomial sd 0.025 over 400 draws), the two crops independent (p 0.25)
    assert 0.42 < unmasked[:, 0].mean() < 0.58 and 0.42 < unmasked[:, 1].mean() < 0.58
    assert 0.17 < (unmasked[:, 0] & unmasked[:, 1]).mean() < 0.33
    # otherwise at most r * 196 with r <= 0.5; the official generator gives a mean of ~57.6 patches
    assert counts.max() <= 98
    assert 50 < counts[~unmasked].mean() < 66


def test_dataset_item_crops_and_masks_are_deterministic():
    cfg = tiny_cfg()
    ds = data.Seeded(data.Shapes('train', 32, length=4), ibot.MultiCropMasks(cfg), with_rng=True)
    (crops, masks), _ = ds[(1, 7)]
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert masks.shape == (2, 4, 4) and masks.dtype == torch.bool
    (crops2, masks2), _ = ds[(1, 7)]
    assert torch.equal(masks, masks2) and all(torch.equal(a, b) for a, b in zip(crops, crops2))


def dino_interpolate_pos_encoding(pos_embed, patch_size, w, h):
    """The official iBOT / DINO VisionTransformer.interpolate_pos_encoding(x, w, h), written out for pos_embed
    (1, 1+N, D) and an input of w x h pixels (w the first spatial dimension, as `B, nc, w, h = x.shape` there)."""
    N = pos_embed.shape[1] - 1
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch_size + 0.1, h // patch_size + 0.1
    patch_pos_embed = torch.nn.functional.interpolate(
        pos_embed[:, 1:].reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode='bicubic')
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((pos_embed[:, :1], patch_pos_embed), dim=1)


def test_local_crop_position_embedding_is_the_official_scale_factor_form():
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 196, 24) * 0.02  # a 14 x 14 grid, as ViT-B/16 at 224 px; local crops 96 px -> 6 x 6
    want = dino_interpolate_pos_encoding(pe, 16, 96, 96)
    got = vit.interpolate_pos_embed(pe, (6, 6), dino_scale=True)
    assert got.shape == (1, 37, 24) and torch.allclose(got, want, atol=1e-7)
    size_form = vit.interpolate_pos_embed(pe, (6, 6))  # the size= form (fine-tuning) gives other values
    assert (size_form - want)[:, 1:].pow(2).mean().sqrt() > 1e-3
    assert torch.equal(vit.interpolate_pos_embed(pe, (14, 14), dino_scale=True), pe)  # global crops: unchanged
    # iBOT's backbone uses it for its local crops: embed = patch embedding + the official embedding (4 x 4 -> 2 x 2)
    model = ibot.iBOT(tiny_cfg())
    bb = model.backbone
    with torch.no_grad():
        bb.pos_embed.normal_(std=0.02)
        x = torch.randn(3, 3, 16, 16)
        want = bb.patch_embed(x) + dino_interpolate_pos_encoding(bb.pos_embed, 8, 16, 16)[:, 1:]
        assert torch.allclose(bb.embed(x), want, atol=1e-6)
    assert not vit.vit('tiny', img_size=32, patch_size=8).dino_interp  # fine-tuning / evaluation: the size= form


# ----------------------------------------------------------------------------- losses


def logits_for(probs, temp, shift=0.0):
    """Logits whose softmax at temperature `temp` (after subtracting `shift`) is `probs`."""
    return temp * torch.log(torch.tensor(probs)) + shift


A, B_, C = [1 / 2, 1 / 4, 1 / 4], [1 / 4, 1 / 2, 1 / 4], [1 / 4, 1 / 4, 1 / 2]
# cross-entropy -sum p log q between two of A, B_, C: 1.5 ln2 for the same one, 1.75 ln2 for different ones


def test_teacher_probs_centering_and_sharpening():
    center = torch.tensor([[1.0, -2.0, 0.5]])
    t = 0.04 * torch.tensor([[0.0, math.log(3), 0.0]]) + center
    assert torch.allclose(ibot.teacher_probs(t, center, 0.04), torch.tensor([[0.2, 0.6, 0.2]]), atol=1e-6)


def test_losses_hand_computed():
    """2 global crops, 2 images, 4 patches, K = 3 (and a variant with one local crop)."""
    ts, tt, ttp = 0.1, 0.04, 0.07
    center, center_patch = torch.tensor([[0.3, -0.1, 0.2]]), torch.tensor([[[-0.5, 0.0, 0.4]]])
    # teacher [CLS]: view 0 = (A, B), view 1 = (A, C); student [CLS]: view 0 = (A, A), view 1 = (B, C)
    t_cls = torch.stack([logits_for(p, tt) for p in (A, B_, A, C)]) + center  # (G*B, K), view-major
    s_cls = torch.stack([logits_for(p, ts) for p in (A, A, B_, C)])
    # teacher patches all A; student patches per (view, image); masks per (view, image)
    t_patch = logits_for(A, ttp).expand(4, 4, 3) + center_patch
    s_patch = torch.stack([torch.stack([logits_for(p, ts) for p in row]) for row in
                           [(A, B_, B_, B_), (A, A, A, A), (B_, B_, B_, A), (B_, B_, A, A)]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [1, 1, 1, 0]], dtype=torch.bool)
    loss, stats = ibot.ibot_loss(s_cls, s_patch, t_cls, t_patch, mask, center, center_patch, (tt, ttp), ts, (1.0, 0.5))
    # L_CLS pairs (q=0, v=1): [CE(A,B) + CE(B,C)]/2 = 1.75; (q=1, v=0): [CE(A,A) + CE(C,A)]/2 = 1.625 (x ln2)
    l_cls = (1.75 + 1.625) / 2 * LN2
    # L_MIM view 0: image 0 masked {0, 1}: (1.5 + 1.75)/2 = 1.625, image 1 unmasked: 0 -> 0.8125
    #       view 1: image 0 masked {3}: 1.5, image 1 masked {0, 1, 2}: (1.75 + 1.75 + 1.5)/3 -> (1.5 + 5/3)/2
    l_mim = (0.8125 + (1.5 + 5 / 3) / 2) / 2 * LN2
    ent = 1.5 * LN2  # H(A) = H(B) = H(C)
    assert torch.allclose(stats, torch.tensor([l_cls, l_mim, ent, l_cls - ent]), atol=1e-5)
    assert torch.isclose(loss, torch.tensor(l_cls + 0.5 * l_mim), atol=1e-5)
    # one local crop (student [CLS] = (C, A)) adds the pairs (0, 2) and (1, 2): 1.75 each
    s_cls3 = torch.cat([s_cls, torch.stack([logits_for(C, ts), logits_for(A, ts)])])
    _, stats3 = ibot.ibot_loss(s_cls3, s_patch, t_cls, t_patch, mask, center, center_patch, (tt, ttp), ts, (1, 1))
    assert torch.isclose(stats3[0], torch.tensor((1.75 + 1.75 + 1.625 + 1.75) / 4 * LN2), atol=1e-5)


def test_only_masked_patches_contribute_to_mim():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5, 7), torch.softmax(torch.randn(2, 3, 5, 7), -1)
    mask = torch.rand(2, 3, 5) < 0.5
    mask[0, 1] = False  # an image without mask
    base = ibot.mim_loss(s, t, mask, 0.1)
    s2 = s.clone()
    s2[~mask] = torch.randn(int((~mask).sum()), 7) * 10  # anything at the visible patches
    assert torch.isclose(ibot.mim_loss(s2, t, mask, 0.1), base)
    s3 = s.clone()
    s3[mask] += torch.randn(int(mask.sum()), 7)
    assert not torch.isclose(ibot.mim_loss(s3, t, mask, 0.1), base)
    assert ibot.mim_loss(s, t, torch.zeros_like(mask), 0.1) == 0


@pytest.fixture(scope='module')
def tiny_model():
    torch.manual_seed(0)
    return ibot.iBOT(tiny_cfg()).eval()


def test_unmasked_student_equal_to_teacher_gives_teacher_entropy(tiny_model):
    model = tiny_model
    x = torch.randn(4, 3, 32, 32)  # 2 views x 2 images
    with torch.no_grad():
        t_cls, t_patch = model(x)  # the teacher: unmasked
        s_cls, s_patch = model(x, None, torch.zeros(4, 16, dtype=torch.bool))  # the student: empty mask
    assert torch.equal(s_patch, t_patch) and torch.equal(s_cls, t_cls)
    everywhere = torch.ones(2, 2, 16, dtype=torch.bool)
    # same temperature, no center: P_t = P_s, and H(P, P) = H(P), the mean entropy -sum p log p
    t4, s4 = t_patch.view(2, 2, 16, -1), s_patch.view(2, 2, 16, -1)  # (G, B, L, K)
    p = torch.softmax(t4 / 0.1, -1)
    ce = ibot.mim_loss(s4, ibot.teacher_probs(t4, 0.0, 0.1), everywhere, 0.1)
    assert torch.isclose(ce, -(p * p.log()).sum(-1).mean(), rtol=1e-5)
    # a sharper teacher: CE = H(P_t) + KL(P_t || P_s) > H(P_t)  (Gibbs)
    pt = ibot.teacher_probs(t4, 0.0, 0.04)
    ce_sharp = ibot.mim_loss(s4, pt, everywhere, 0.1)
    assert ce_sharp > ibot.entropy(pt) + 1e-4


# ----------------------------------------------------------------------------- centers


def test_center_update_formula():
    t_cls = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t_patch = torch.tensor([[[0.0, 0.0], [2.0, 4.0]], [[4.0, 0.0], [6.0, 8.0]]])  # patch means (1, 2), (5, 4)
    c, cp = ibot.update_centers(torch.tensor([[10.0, 0.0]]), torch.zeros(1, 1, 2), ibot.center_sums(t_cls, t_patch),
                                2, 0.9)
    assert torch.allclose(c, torch.tensor([[0.9 * 10 + 0.1 * 2, 0.1 * 3]]))  # batch mean (2, 3)
    assert torch.allclose(cp, torch.tensor([[[0.1 * 3, 0.1 * 3]]]))  # mean over images and all patches (3, 3)


def _center_worker(rank, init, t_cls, t_patch, out):
    dist.init_process_group('gloo', init_method=init, rank=rank, world_size=2)
    half = slice(3 * rank, 3 * rank + 3)
    c, cp = ibot.update_centers(torch.ones(1, 5), torch.ones(1, 1, 5), ibot.center_sums(t_cls[half], t_patch[half]),
                                3, 0.9)
    torch.save((c, cp), f'{out}.{rank}')
    dist.destroy_process_group()


def test_center_update_across_two_gloo_ranks_equals_concatenated_batch(tmp_path):
    torch.manual_seed(0)
    t_cls, t_patch = torch.randn(6, 5), torch.randn(6, 4, 5)
    out = str(tmp_path / 'c')
    # fork: the workers need no fresh interpreter (spawn would re-import torch in each)
    mp.start_processes(_center_worker, args=(f'file://{tmp_path}/rdv', t_cls, t_patch, out), nprocs=2,
                       start_method='fork')
    want = ibot.update_centers(torch.ones(1, 5), torch.ones(1, 1, 5), ibot.center_sums(t_cls, t_patch), 6, 0.9)
    for r in range(2):
        got = torch.load(f'{out}.{r}')
        assert torch.allclose(got[0], want[0], atol=1e-6) and torch.allclose(got[1], want[1], atol=1e-6)


def test_main_centers_are_the_mean_over_teacher_rows(tmp_path, monkeypatch):
    """Two real steps of main() (2 images x 2 micro-batches each): the centers after them equal
    c2 = m c1 + (1 - m) mean2 with c1 = (1 - m) mean1 (c0 = 0), each mean taken over *all* teacher rows of the
    step, 2 global crops x 2 images x 2 micro-batches = 8 rows (official iBOTLoss.update_center), for [CLS] and
    for the patches (mean over every patch of those rows). Dividing by the number of images instead gives 2x."""
    seen = []
    loss_fn = ibot.ibot_loss

    def recording_loss(s_cls, s_patch, t_cls, t_patch, *rest):
        seen.append((t_cls.detach().clone(), t_patch.detach().clone()))
        return loss_fn(s_cls, s_patch, t_cls, t_patch, *rest)

    monkeypatch.setattr(ibot, 'ibot_loss', recording_loss)
    m = 0.8
    ck = load_ckpt(run(tmp_path, 'centers', '--batch_size', '2', '--accum_iter', '2', '--max_steps', '2',
                       '--center_momentum', str(m), '--lr', '1e-3', '--warmup_epochs', '0'))
    assert len(seen) == 4 and all(t.shape == (4, 64) for t, _ in seen)  # 4 micro-batches of 2 crops x 2 images
    c, cp = torch.zeros(64), torch.zeros(64)
    for step in (seen[:2], seen[2:]):
        t_cls = torch.cat([t for t, _ in step])  # (8, K): every teacher row of the step
        t_patch = torch.cat([t for _, t in step])  # (8, L, K)
        c = m * c + (1 - m) * t_cls.mean(0)
        cp = m * cp + (1 - m) * t_patch.mean((0, 1))
    assert torch.allclose(ck['centers']['center'].view(-1), c, atol=1e-5)
    assert torch.allclose(ck['centers']['center_patch'].view(-1), cp, atol=1e-5)
    assert not torch.allclose(c, 2 * c, atol=1e-3)  # the test tells the two divisors apart


# ----------------------------------------------------------------------------- schedules, clipping, EMA


def test_schedules():
    near = pytest.approx
    assert ibot.lr_at(0, 1.0, 0.0, 10, 110) == 0.0 and ibot.lr_at(10, 1.0, 0.0, 10, 110) == 1.0  # warm-up from 0
    assert ibot.lr_at(60, 1.0, 0.0, 10, 110) == near(0.5) and ibot.lr_at(110, 1.0, 1e-6, 10, 110) == near(1e-6)
    # weight decay 0.04 -> 0.4 and EMA momentum 0.996 -> 1, cosine over the whole run
    assert ibot.cosine_at(0, 0.04, 0.4, 100) == near(0.04) and ibot.cosine_at(50, 0.04, 0.4, 100) == near(0.22)
    assert ibot.cosine_at(100, 0.04, 0.4, 100) == near(0.4)
    assert ibot.cosine_at(0, 0.996, 1.0, 100) == near(0.996) and ibot.cosine_at(100, 0.996, 1.0, 100) == 1.0
    # temperatures: np.linspace(0.04, 0.07, 30)[epoch], then 0.07; before pred_start_epoch held at 0.04
    assert ibot.teacher_temp_at(0, 0.04, 0.07, 30) == 0.04
    assert abs(ibot.teacher_temp_at(10, 0.04, 0.07, 30) - np.linspace(0.04, 0.07, 30)[10]) < 1e-12
    assert ibot.teacher_temp_at(29, 0.04, 0.07, 30) == 0.07 and ibot.teacher_temp_at(500, 0.04, 0.07, 30) == 0.07
    assert ibot.teacher_temp_at(-3, 0.04, 0.07, 30) == 0.04 and ibot.teacher_temp_at(0, 0.04, 0.07, 0) == 0.07
    # the official per-epoch array, np.concatenate((np.linspace(w, t, W), np.ones(E - W) * t)), for every W
    for W in (1, 2, 3, 30):
        official = np.concatenate((np.linspace(0.04, 0.07, W), np.ones(40 - W) * 0.07))
        assert np.allclose([ibot.teacher_temp_at(e, 0.04, 0.07, W) for e in range(40)], official, atol=1e-12), W


def test_clip_is_per_tensor():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    a.grad, b.grad = torch.tensor([6.0, 0.0]), torch.tensor([0.0, 0.6, 0.8])  # norms 6 and 1
    total = ibot.clip_per_tensor_([a, b], 3.0)
    assert torch.isclose(total, torch.tensor(37.0).sqrt())
    assert torch.allclose(a.grad, torch.tensor([3.0, 0.0]), atol=1e-5)  # only the large one is scaled, to 3
    assert torch.equal(b.grad, torch.tensor([0.0, 0.6, 0.8]))


def test_ema_update():
    s, t = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    want = [0.9 * pt.detach() + 0.1 * ps.detach() for pt, ps in zip(t.parameters(), s.parameters())]
    ibot.ema_update(t, s, 0.9)
    assert all(torch.allclose(p, w) for p, w in zip(t.parameters(), want))


def test_head_weight_norm_and_param_groups(tiny_model):
    model = tiny_model
    ll = model.head.last_layer
    z = torch.randn(5, 256)
    w = ll.weight_v / ll.weight_v.norm(dim=1, keepdim=True)
    assert torch.allclose(ll(z), z @ w.T, atol=1e-6)  # g = 1: unit prototypes
    assert model.head.last_layer2 is ll and not ll.weight_g.requires_grad  # shared, norm_last_layer
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ibot.param_groups(model, 0.04)
    nd = {names[id(p)] for p in no_decay['params']}
    d = {names[id(p)] for p in decay['params']}
    assert 'backbone.blocks.0.norm1.weight' in nd and 'head.mlp.0.bias' in nd
    assert {'backbone.mask_token', 'backbone.pos_embed', 'head.last_layer.weight_v'} <= d
    assert 'head.last_layer.weight_g' not in d | nd  # frozen
    free = ibot.iBOTHead(192, 16, 32, shared=False, norm_last_layer=False)
    assert free.last_layer2 is not free.last_layer and free.last_layer.weight_g.requires_grad


# ----------------------------------------------------------------------------- training runs


def changed(a, b):
    return (a - b).abs().max().item() > 1e-5


def test_short_run_learns_without_collapse(tmp_path):
    out = run(tmp_path, 'learn', '--batch_size', '8', '--max_steps', '16', '--lr', '2e-3', '--warmup_epochs', '0',
              '--freeze_last_layer', '0')
    log = [json.loads(l) for l in open(os.path.join(out, 'log.jsonl'))]
    assert len(log) == 16 and all(math.isfinite(v) for r in log for v in r.values())
    # L_CLS = H(P_t) + KL(P_t || P_s): the student can only lower the KL; H(P_t) first rises while the center
    # catches up with the teacher's common mode (that is centering at work), so the KL is the loss to watch here
    first, last = [sum(r['kl'] for r in log[s]) / 4 for s in (slice(0, 4), slice(-4, None))]
    assert last < 0.5 * first
    # collapse to one prototype drives the teacher's entropy to 0; collapse to uniform drives it to ln K = ln 64
    # = 4.16 with KL -> 0: the teacher must spread over more than 2 prototypes (perplexity e^H > 2) and stay
    # away from uniform, with the student not yet equal to it
    for r in log[-4:]:
        assert math.log(2) < r['t_entropy'] < math.log(64) - 0.2 and r['kl'] > 0.01
    ck = load_ckpt(out)
    # --freeze_last_layer 0: the last layer is trained
    assert changed(ck['model']['head.last_layer.weight_v'], ck['teacher']['head.last_layer.weight_v'])


def test_resume_equals_uninterrupted_and_checkpoint_contract(tmp_path):
    common = ['--batch_size', '4', '--lr', '1e-3', '--warmup_epochs', '0']
    a = run(tmp_path, 'straight', '--max_steps', '3', *common)
    run(tmp_path, 'split', '--max_steps', '2', *common)
    b = run(tmp_path, 'split', '--max_steps', '3', '--resume', 'auto', *common)
    pa, pb = load_ckpt(a), load_ckpt(b)
    assert pb['step'] == 3 and pa['method'] == 'ibot'
    for part in ('model', 'teacher'):
        for k in pa[part]:
            assert torch.equal(pa[part][k], pb[part][k]), (part, k)
    assert torch.equal(pa['centers']['center'], pb['centers']['center']) and torch.equal(pa['centers']['center_patch'], pb['centers']['center_patch'])
    assert pa['centers']['center'].abs().sum() > 0 and pa['centers']['center_patch'].shape == (1, 1, 64)
    assert torch.equal(pa['optimizer']['state'][0]['exp_avg'], pb['optimizer']['state'][0]['exp_avg'])
    # epoch 0 < --freeze_last_layer 1: the student's last layer never moved, so the teacher's EMA of it is the same
    s, t = pa['model'], pa['teacher']
    assert torch.equal(s['head.last_layer.weight_v'], t['head.last_layer.weight_v'])
    assert changed(s['backbone.blocks.0.attn.qkv.weight'], t['backbone.blocks.0.attn.qkv.weight'])
    # `encoder` is the teacher backbone, a plain ViT
    enc = vit.vit('micro', img_size=32, patch_size=8, num_classes=0, pos_embed='learned')
    enc.load_state_dict(pa['encoder'], strict=True)
    assert torch.equal(pa['encoder']['blocks.0.attn.qkv.weight'], t['backbone.blocks.0.attn.qkv.weight'])


def test_two_ranks_with_accumulation_equal_one_process(tmp_path):
    """torchrun 2 x (2 images x 2 micro-batches) = one process with batch 8: DDP, no_sync, the centers' all-reduce
    and their sums over micro-batches."""
    script = tmp_path / 'ibot_micro.py'
    script.write_text('import vit\nvit.SIZES["micro"] = (64, 2, 2, 8)\nimport ibot\nibot.main()\n')
    common = TINY + ['--max_steps', '2', '--lr', '1e-3', '--warmup_epochs', '0', '--drop_path', '0', '--device', 'cpu']
    run_torchrun(str(script), common + ['--batch_size', '2', '--accum_iter', '2', '--out_dir', str(tmp_path / 'ddp')])
    single = load_ckpt(run(tmp_path, 'single', '--batch_size', '8', '--max_steps', '2', '--lr', '1e-3',
                           '--warmup_epochs', '0', '--drop_path', '0'))
    ddp = load_ckpt(str(tmp_path / 'ddp'))
    for a, b in zip(*[[json.loads(l) for l in open(tmp_path / d / 'log.jsonl')] for d in ('single', 'ddp')]):
        for key in ('cls', 'mim', 't_entropy'):  # step 2 runs on the weights of step 1's update
            assert abs(a[key] - b[key]) < 1e-5 * abs(a[key]) + 1e-7, (a['step'], key)
    assert torch.allclose(single['centers']['center'], ddp['centers']['center'], atol=1e-6)
    assert torch.allclose(single['centers']['center_patch'], ddp['centers']['center_patch'], atol=1e-6)
    for part in ('model', 'teacher'):
        for k in single[part]:
            a, b = single[part][k], ddp[part][k]
            if k.endswith('attn.qkv.bias'):  # the key bias has an exact zero gradient: Adam amplifies float noise
                n = a.numel() // 3
                a, b = torch.cat([a[:n], a[2 * n:]]), torch.cat([b[:n], b[2 * n:]])
            # an element whose gradient is ~0 can still move by up to lr per step on last-bit differences in the
            # summation order; all but a few agree to 1e-5
            d = (a - b).abs()
            assert d.max() <= 2 * 1e-3 and (d > 1e-5).float().mean() < 0.01, (part, k)


def test_separate_student_patch_head_teacher_still_shares(tmp_path):
    """--shared_head false: the student has its own patch layer (last_layer2), the teacher's head stays shared
    (official shared_head_teacher), starting from the student's last_layer2 and following the EMA of the student's
    [CLS] last_layer. One real step of main(); in epoch 0 (--freeze_last_layer 1) the student's last layers do not
    move, so the teacher's layer is m * last_layer2 + (1 - m) * last_layer of the saved student, m = 0.996."""
    ck = load_ckpt(run(tmp_path, 'sep', '--shared_head', 'false', '--batch_size', '4', '--max_steps', '1',
                       '--lr', '1e-3', '--warmup_epochs', '0'))
    s, t = ck['model'], ck['teacher']
    assert not torch.equal(s['head.last_layer.weight_v'], s['head.last_layer2.weight_v'])  # the student: separate
    assert torch.equal(t['head.last_layer.weight_v'], t['head.last_layer2.weight_v'])  # the teacher: one layer
    want = 0.996 * s['head.last_layer2.weight_v'] + 0.004 * s['head.last_layer.weight_v']
    assert torch.allclose(t['head.last_layer.weight_v'], want, atol=1e-7)
    model = ibot.iBOT(tiny_cfg(shared_head=False))
    teacher = ibot.build_teacher(model)
    assert teacher.head.last_layer is teacher.head.last_layer2 and model.head.last_layer is not model.head.last_layer2
    assert all(b.drop_path == 0.0 for b in teacher.backbone.blocks) and not any(p.requires_grad
                                                                                for p in teacher.parameters())


def test_explicit_zero_is_not_replaced_by_the_embedded_default():
    cfg = ibot.get_config(['--local_crops_number', '0', '--num_workers', '0', '--warmup_epochs', '0'])
    assert (cfg.local_crops_number, cfg.num_workers, cfg.warmup_epochs) == (0, 0, 0)
    cfg = ibot.get_config([])
    assert (cfg.local_crops_number, cfg.out_dim, cfg.img_size, cfg.local_size) == (2, 1024, 64, 32)


@pytest.mark.parametrize('args,msg', [
    (['--no_such_flag', '1'], 'unrecognized arguments'),
    (['--local_size', '30'], 'not divisible'),
    (['--pred_ratio', '0.1', '--pred_ratio_var', '0.2'], 'pred_ratio'),
    (['--model', 'gigantic'], '--model must be one of'),
    (['--teacher_temp', '0'], 'temperatures'),
])
def test_bad_flags_one_clear_line(args, msg, capsys):
    with pytest.raises(SystemExit):
        ibot.get_config(args)
    err = capsys.readouterr().err
    assert msg in err and 'Traceback' not in err


def test_bad_data_and_foreign_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match='error: --data /no/such/folder: folder does not exist'):
        ibot.main(TINY + ['--data', '/no/such/folder', '--out_dir', str(tmp_path)])
    (tmp_path / 'x').mkdir()
    torch.save({'method': 'mae', 'config': {}}, tmp_path / 'x' / 'checkpoint.pt')
    with pytest.raises(SystemExit, match='is an MAE checkpoint, not an iBOT checkpoint'):
        ibot.main(TINY + ['--out_dir', str(tmp_path / 'x'), '--resume', 'auto', '--max_steps', '1'])


def test_vit_s_readme_command_is_the_official_vit_s_command():
    """The official ViT-S/16 command (iBOT README: --arch vit_small --teacher_temp 0.07 --warmup_teacher_temp_epochs 30
    --norm_last_layer false --epochs 800 --batch_size_per_gpu 64 on 16 GPUs --shared_head true --out_dim 8192
    --local_crops_number 10 --global_crops_scale 0.25 1 --local_crops_scale 0.05 0.25 --pred_ratio 0 0.3
    --pred_ratio_var 0 0.2, parser defaults for the rest) is what the README's ViT-S line resolves to on 8 GPUs."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'README.md')).read()
    line = next(l for l in readme.splitlines() if 'ibot.py' in l and '--model small' in l)
    assert line.startswith('torchrun --nproc_per_node=8 ')
    argv = line.split('ibot.py', 1)[1].split('#')[0].split()
    argv[argv.index('--data') + 1] = os.path.dirname(__file__)  # any folder: the folder regime
    cfg = ibot.get_config(argv)
    official = dict(model='small', patch_size=16, img_size=224, local_size=96, teacher_temp=0.07,
                    warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30, teacher_patch_temp=0.07,
                    warmup_teacher_patch_temp=0.04, norm_last_layer=False, epochs=800, shared_head=True,
                    out_dim=8192, head_hidden=2048, local_crops_number=10, global_scale_min=0.25, local_scale_min=0.05,
                    pred_ratio=0.3, pred_ratio_var=0.2, no_mask_prob=0.5, blr=5e-4, min_lr=1e-6, warmup_epochs=10,
                    weight_decay=0.04, weight_decay_end=0.4, ema_momentum=0.996, clip_grad=3.0, freeze_last_layer=1,
                    drop_path=0.1, student_temp=0.1, center_momentum=0.9, lambda1=1.0, lambda2=1.0)
    got = {k: getattr(cfg, k) for k in official}
    assert got == official, {k: (got[k], v) for k, v in official.items() if got[k] != v}
    assert cfg.batch_size * cfg.accum_iter * 8 == 64 * 16  # global batch 1024
    # norm_last_layer follows the size unless given: ViT-B keeps the weight-norm gain frozen, as its command does
    base = ibot.get_config(['--data', os.path.dirname(__file__)])
    assert base.model == 'base' and base.norm_last_layer is True
    assert ibot.get_config(['--data', os.path.dirname(__file__), '--model', 'small',
                            '--norm_last_layer', 'true']).norm_last_layer is True
