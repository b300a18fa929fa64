"""Equal to the official code: nanoMIM's MAE, LUT, iBOT and DTM against the outputs the official implementations
returned on the same weights and inputs (tests/fixtures/official/, provenance in its README.md), to 1e-5.

Each check goes through the functions main() runs: the model's forward and the method's train_step (MAE, LUT,
iBOT), the schedules() of the step, the loader's mask recipe (iBOT), morph_schedule / morph_clusters / dtm_loss
(DTM). The official weights load by name, with the one renaming written out below, strictly."""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import dtm
import ibot
import lut
import mae
import vit

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'official')
TOL = 1e-5  # absolute, relative above 1: |nanoMIM - official| <= TOL * max(1, |official|)

# official models_mae.py / models_lut.py parameter name -> nanoMIM's: the backbone sits under `encoder.` in vit.py's
# common ViT layout (same names below it); the decoder, mask token, head and predictor keep the official names
OFFICIAL_TO_NANOMIM = {'cls_token': 'encoder.cls_token', 'pos_embed': 'encoder.pos_embed',
                       'patch_embed.': 'encoder.patch_embed.', 'blocks.': 'encoder.blocks.', 'norm.': 'encoder.norm.'}


def load(name):
    return torch.load(os.path.join(FIXTURES, f'{name}.pt'), map_location='cpu', weights_only=True)


def rename(name):
    for official, ours in OFFICIAL_TO_NANOMIM.items():
        if name == official or (official.endswith('.') and name.startswith(official)):
            return ours + name[len(official):]
    return name


def load_official(model, state_dict):
    """Official weights into a nanoMIM model by name; strict: every tensor on both sides is matched."""
    sd = {rename(k): v for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, f'names do not match: nanoMIM only {missing}, official only {unexpected}'
    model.load_state_dict(sd, strict=True)


def close(what, ours, official):
    """Assert ours == official to TOL, naming the quantity, the largest difference and where it is."""
    ours, official = torch.as_tensor(ours).detach().float(), torch.as_tensor(official).float()
    assert ours.shape == official.shape, f'{what}: nanoMIM shape {tuple(ours.shape)}, official {tuple(official.shape)}'
    err = (ours - official).abs() / official.abs().clamp(min=1.0)
    if err.numel() and err.max() > TOL:
        i = np.unravel_index(int(err.argmax()), tuple(err.shape)) if err.ndim else ()
        raise AssertionError(f'{what} differs from the official code: nanoMIM {ours[i].item():.7g}, official '
                             f'{official[i].item():.7g} at index {tuple(int(j) for j in i)} '
                             f'(|difference| / max(1, |official|) = {err.max().item():.3g} > {TOL})')


@pytest.fixture
def official_size(monkeypatch):
    """The fixtures' ViT (width 64, depth 2, 4 heads, patch 8) as a size name vit.vit builds, for this test only."""
    def add(c):
        monkeypatch.setitem(vit.SIZES, 'official', (c['embed_dim'], c['depth'], c['num_heads'], c['patch_size']))
        assert c['mlp_ratio'] == 4  # vit.Block's default
        return ['--model', 'official', '--img_size', str(c['img_size']), '--patch_size', str(c['patch_size']),
                '--decoder_dim', str(c['decoder_embed_dim']), '--decoder_depth', str(c['decoder_depth']),
                '--decoder_heads', str(c['decoder_num_heads']), '--mask_ratio', str(c['mask_ratio']),
                '--num_workers', '0']
    return add


def fixed_pos_embeds_match(model, sd):
    """nanoMIM builds its fixed sin-cos position embeddings itself: they must be the official ones."""
    close('encoder sin-cos pos_embed', model.encoder.pos_embed, sd['pos_embed'])
    close('decoder sin-cos pos_embed', model.decoder_pos_embed, sd['decoder_pos_embed'])

# -----------------------------------------------------------------------------
# MAE: facebookresearch/mae models_mae.py MaskedAutoencoderViT.forward


@pytest.mark.parametrize('norm_pix', [True, False])
def test_mae_forward_and_step_loss(official_size, norm_pix):
    f = load('mae')
    cfg = mae.get_config(official_size(f['config']) + ['--norm_pix_loss', str(norm_pix)])
    model = mae.MAE(cfg)
    fixed_pos_embeds_match(model, f['state_dict'])
    load_official(model, f['state_dict'])
    with torch.no_grad():
        loss, pred, mask = model(f['imgs'], f['noise'], cfg.mask_ratio, cfg.norm_pix_loss)
    close('MAE mask (1 = removed)', mask, f['mask'])
    close(f'MAE prediction (norm_pix {norm_pix})', pred, f[f'pred_norm_pix_{norm_pix}'])
    close(f'MAE loss (norm_pix {norm_pix})', loss, f[f'loss_norm_pix_{norm_pix}'])
    _, autocast, scaler = mae.setup_precision(cfg, 'cpu')
    optimizer = torch.optim.AdamW(mae.param_groups(model, cfg.weight_decay))
    stats = mae.train_step(model, model, optimizer, scaler, autocast, [(f['imgs'], f['noise'])],
                           mae.schedules(0, cfg, 1e-3, 0, 10), cfg)
    close(f'MAE train_step loss (norm_pix {norm_pix})', stats[mae.STATS.index('loss')], f[f'loss_norm_pix_{norm_pix}'])

# -----------------------------------------------------------------------------
# LUT: naver-ai/lut models/models_lut.py forward, engines/engine_lut.py losses


def test_lut_two_disjoint_masks_from_one_noise():
    f = load('lut')
    K = int(f['noise'].shape[1] * (1 - f['config']['mask_ratio']))
    keep1, keep2, _ = lut.two_view_masks(f['noise'], f['config']['mask_ratio'])
    order = f['noise'].argsort(dim=1)  # official: view 1 keeps the K smallest noise values, view 2 the next K
    for b in range(f['noise'].shape[0]):
        for view, ours, official in ((1, keep1[b], order[b, :K]), (2, keep2[b], order[b, K:2 * K])):
            assert set(ours.tolist()) == set(official.tolist()), \
                f'image {b}: view {view} keeps patches {sorted(ours.tolist())}, official {sorted(official.tolist())}'
        assert not set(keep1[b].tolist()) & set(keep2[b].tolist()), f'image {b}: the two views share kept patches'


def test_lut_forward_momentum_branch_and_step_losses(official_size):
    f = load('lut')
    c = f['config']
    argv = official_size(c) + ['--head_dim', str(c['head_mlp_dim']), '--norm_pix_loss', str(c['norm_pix_loss']),
                               '--w_mae', '1', '--w_bc', '1']
    cfg = lut.get_config(argv)
    model = lut.LUT(cfg).train()
    fixed_pos_embeds_match(model, f['state_dict'])
    load_official(model, f['state_dict'])
    teacher = lut.Momentum(model)  # a copy of the same weights, eval mode, as main() builds it
    v1, v2, noise = f['imgs1'], f['imgs2'], f['noise']
    with torch.no_grad():
        loss_mae, q1, q2, _, _ = model(v1, v2, noise, cfg.mask_ratio, cfg.norm_pix_loss)  # train-mode BatchNorm
        z1, z2 = teacher(v1), teacher(v2)
    close('LUT q = cat(q1, q2) (online, train-mode BN)', torch.cat([q1, q2]), f['q'])
    close('LUT z = cat(z1, z2) (momentum branch, eval mode)', torch.cat([z1, z2]), f['z'])
    close('LUT L_MAE', loss_mae, f['loss_mae'])
    close('LUT L_BC', lut.bc_loss(q1, q2, z1, z2), f['loss_bc'])
    _, autocast, scaler = lut.setup_precision(cfg, 'cpu')
    optimizer = torch.optim.AdamW(lut.param_groups(model, cfg.weight_decay))
    stats = lut.train_step(model, model, teacher, optimizer, scaler, autocast, [(v1, v2, noise)],
                           lut.schedules(0, cfg, 1e-3, 0, 10), cfg)
    close('LUT train_step L_MAE', stats[lut.STATS.index('loss_mae')], f['loss_mae'])
    close('LUT train_step L_BC', stats[lut.STATS.index('loss_bc')], f['loss_bc'])
    close('LUT train_step loss (w_mae = w_bc = 1)', stats[lut.STATS.index('loss')], f['loss_mae'] + f['loss_bc'])

# -----------------------------------------------------------------------------
# iBOT: bytedance/ibot main_ibot.py iBOTLoss.forward and its center update, loader.py ImageFolderMask


class Outputs(nn.Module):
    """Stands in for the student / teacher network in ibot.train_step: returns the case's network outputs as
    iBOT.forward lays them out ([CLS] logits of the globals then the locals, patch logits of the globals); a zero
    parameter lets the step's backward, clip and optimizer run."""

    def __init__(self, cls, patch, local_cls=None):
        super().__init__()
        self.cls, self.patch, self.local_cls = cls, patch, local_cls
        self.zero = nn.Parameter(torch.zeros(()))

    def forward(self, globals_, locals_=None, mask=None):
        cls = self.cls if locals_ is None else torch.cat([self.cls, self.local_cls])
        return cls + self.zero, self.patch + self.zero


def ibot_config(f, argv=()):
    """ibot.get_config with the fixture's loss settings, as a user would pass them."""
    return ibot.get_config(['--out_dim', str(f['K']), '--local_crops_number', str(f['nlcrops']),
                            '--student_temp', str(f['student_temp']), '--center_momentum', str(f['center_momentum']),
                            '--warmup_teacher_temp', str(f['warmup_teacher_temp']),
                            '--teacher_temp', str(f['teacher_temp']),
                            '--warmup_teacher_patch_temp', str(f['warmup_teacher_temp2']),
                            '--teacher_patch_temp', str(f['teacher_temp2']),
                            '--warmup_teacher_temp_epochs', str(f['warmup_teacher_temp_epochs']),
                            '--epochs', str(f['nepochs']), '--pred_start_epoch', '0', '--num_workers', '0', *argv])


@pytest.mark.parametrize('case', [0, 1, 2], ids=['epoch0', 'epoch2', 'epoch7'])
def test_ibot_step_losses_and_centers(case):
    f = load('ibot')
    c = f['cases'][case]
    cfg = ibot_config(f)
    B, N, K, G = f['B'], f['N'], f['K'], f['ngcrops']
    steps_per_epoch = 5
    sched = ibot.schedules(c['epoch'] * steps_per_epoch + 2, cfg, 1e-3, 0, cfg.epochs * steps_per_epoch,
                           steps_per_epoch)  # a step inside the case's epoch
    # the official per-epoch temperatures: np.concatenate((np.linspace(warmup, temp, warmup_epochs), constant))
    w = f['warmup_teacher_temp_epochs']
    temps = [np.concatenate((np.linspace(f[f'warmup_teacher_temp{s}'], f[f'teacher_temp{s}'], w),
                             np.ones(f['nepochs'] - w) * f[f'teacher_temp{s}']))[c['epoch']] for s in ('', '2')]
    close(f'iBOT [CLS] teacher temperature at epoch {c["epoch"]}', sched['temp'], temps[0])
    close(f'iBOT patch teacher temperature at epoch {c["epoch"]}', sched['patch_temp'], temps[1])
    student = Outputs(c['student_cls'], c['student_patch'], c['student_local_cls'])
    teacher = Outputs(c['teacher_cls'], c['teacher_patch']).requires_grad_(False)
    centers = ibot.Centers(K)
    centers.center, centers.center_patch = c['center'].clone(), c['center2'].clone()
    _, autocast, scaler = ibot.setup_precision(cfg, 'cpu')
    optimizer = torch.optim.AdamW(ibot.param_groups(student, cfg.weight_decay))
    mask = c['masks'].reshape(G * B, N)  # (G*B, L) bool, crop-major = view-major as main() collates it
    batches = [(torch.zeros(G * B, 3, 8, 8), torch.zeros(f['nlcrops'] * B, 3, 4, 4), mask)]  # pixels unused
    stats = ibot.train_step(student, student, teacher, centers, optimizer, scaler, autocast, batches, sched, cfg)
    at = f'at epoch {c["epoch"]}'
    close(f'iBOT L_CLS {at}', stats[ibot.STATS.index('cls')], c['loss_cls'])
    close(f'iBOT L_MIM {at}', stats[ibot.STATS.index('mim')], c['loss_patch'])
    close(f'iBOT loss {at}', stats[ibot.STATS.index('loss')], c['loss'])
    close(f'iBOT [CLS] center after the update {at}', centers.center, c['center_after'])
    close(f'iBOT patch center after the update {at}', centers.center_patch, c['center2_after'])


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs of a and b."""
    v = np.union1d(a, b)
    cdf = lambda x: np.searchsorted(np.sort(x), v, side='right') / len(x)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


def test_ibot_blockwise_mask_counts_match_official(tmp_path):
    f = load('ibot')
    cfg = ibot.get_config(['--data', str(tmp_path), '--num_workers', '0'])  # a folder: the published recipe
    masks = ibot.MultiCropMasks(cfg)
    assert masks.grid == 14, f'the recipe grid is {masks.grid} x {masks.grid}, the official fixture 14 x 14'
    official = f['block_counts_14x14'].numpy()
    ours = np.concatenate([masks.masks(np.random.default_rng(i)).reshape(2, -1).sum(1)
                           for i in range(len(official) // 2)])  # 2 global crops per image, as the loader draws
    ks = ks_distance(ours, official)
    assert ks <= 0.05, (f'masked-patch counts: KS distance {ks:.3f} > 0.05 to the official distribution '
                        f'(mean {ours.mean():.1f} vs {official.mean():.1f})')
    empty, official_empty = (ours == 0).mean(), (official == 0).mean()
    assert abs(empty - official_empty) <= 0.03, f'empty masks: {empty:.3f} of nanoMIM\'s, {official_empty:.3f} official'

# -----------------------------------------------------------------------------
# DTM: naver-ai/dtm bm/merge.py (ToMe) iterated as engines/engine_for_dtm.py iterates it, and its loss


class Draws:
    """random.Random stand-in for morph_schedule: randint returns the scripted values, checking their range."""

    def __init__(self, *values):
        self.values = list(values)

    def randint(self, a, b):
        v = self.values.pop(0)
        assert a <= v <= b, f'scripted draw {v} outside randint({a}, {b})'
        return v


def clusters_of(source):
    """(clusters, L) 0/1 membership of one image -> its partition as a set of frozensets of token indices."""
    return {frozenset(torch.nonzero(row).flatten().tolist()) for row in source}


@pytest.mark.parametrize('case', range(7))
def test_dtm_morphing_and_loss_without_the_token0_quirk(case):
    f = load('dtm')
    c = f['cases'][case]
    cfg = dtm.Config()  # the defaults main() runs: code sampling, smooth L1 with beta 2
    teacher, student = f['teacher'], f['student']
    B, L, _ = teacher.shape
    name = f'num_merge {c["num_merge"]}, {c["iters"]} iterations'
    rs = dtm.morph_schedule(L, f['n_max'], cfg.morph_k, Draws(c['num_merge'], c['iters']), cfg.morph_sampling)
    assert len(rs) == c['iters'] and rs[0] == c['r'], f'{name}: merges per iteration {rs}, official r = {c["r"]}'
    assign, M = dtm.morph_clusters(teacher, rs, random_split=cfg.morph_sampling == 'paper')
    assert M == c['clusters_quirk_False'], f'{name}: {M} clusters, the official code {c["clusters_quirk_False"]}'
    for b in range(B):
        ours = clusters_of(torch.zeros(M, L).scatter_(0, assign[b][None], 1.0))
        official = clusters_of(c['source_quirk_False'][b])
        assert ours == official, (f'{name}, image {b}: nanoMIM forms clusters {sorted(map(sorted, ours - official))} '
                                  f'where the official code forms {sorted(map(sorted, official - ours))}')
    for norm, key in ((False, 'loss_quirk_False'), (True, 'loss_norm_quirk_False')):
        loss = dtm.dtm_loss(student, teacher, assign, M, cfg.loss_type, cfg.beta, normalize_target=norm)
        close(f'DTM loss ({name}, normalize_target {norm})', loss, c[key])
