"""analyze.py: AAD and spectrum against hand-computed cases, attention rows, reconstruction invariants, and
end-to-end runs on a real mae.py checkpoint (tiny, 32 px) without matplotlib (tables only) and with it (PNGs)."""
import json
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import analyze
import vit
from conftest import load_ckpt, run_script

DIAG_2x2 = (2 + math.sqrt(2)) / 4  # mean distance from a patch to the 4 patches of a 2x2 grid (0, 1, 1, sqrt 2)


def maps_from_patch_weights(w, cls_mass=0.0):
    """(B, H, L, L) patch-key weights of patch queries -> (B, H, 1+L, 1+L) maps; the [CLS] key gets `cls_mass`
    and the patch keys the rest, [CLS] query uniform."""
    B, H, L, _ = w.shape
    a = torch.zeros(B, H, 1 + L, 1 + L, dtype=torch.float64)
    a[:, :, 0, :] = 1.0 / (1 + L)
    a[:, :, 1:, 0] = cls_mass
    a[:, :, 1:, 1:] = (1 - cls_mass) * w
    return a


def test_patch_distances_by_hand():
    d = analyze.patch_distances(2, 3, 10)  # patches (0,0) (0,1) (0,2) / (1,0) (1,1) (1,2)
    assert d.shape == (6, 6)
    assert torch.allclose(d.diagonal(), torch.zeros(6, dtype=torch.float64))
    assert d[0, 1] == pytest.approx(10) and d[0, 2] == pytest.approx(20) and d[0, 3] == pytest.approx(10)
    assert d[0, 5] == pytest.approx(math.sqrt(1 + 4) * 10) and d[2, 3] == pytest.approx(math.sqrt(5) * 10)
    assert torch.allclose(d, d.T)


@pytest.mark.parametrize('cls_key', ['renorm', 'zero'])
@pytest.mark.parametrize('cls_mass', [0.0, 0.5])
def test_aad_all_mass_on_self_is_zero(cls_key, cls_mass):
    w = torch.eye(9, dtype=torch.float64).expand(2, 3, 9, 9)
    a = maps_from_patch_weights(w, cls_mass)
    out = analyze.attention_distance(a, analyze.patch_distances(3, 3, 16), cls_key)
    assert out.shape == (2, 3)
    assert torch.allclose(out, torch.zeros(2, 3, dtype=torch.float64))


def test_aad_uniform_on_2x2_grid():
    p = 16
    d = analyze.patch_distances(2, 2, p)
    w = torch.full((1, 2, 4, 4), 0.25, dtype=torch.float64)
    no_cls = analyze.attention_distance(maps_from_patch_weights(w), d)
    assert torch.allclose(no_cls, torch.full((1, 2), DIAG_2x2 * p, dtype=torch.float64))
    # [CLS] takes 1/5 of every row (uniform over all 5 tokens): renorm ignores it, zero counts it at distance 0
    a = maps_from_patch_weights(w, cls_mass=0.2)
    assert torch.allclose(analyze.attention_distance(a, d, 'renorm'), no_cls)
    assert torch.allclose(analyze.attention_distance(a, d, 'zero'), 0.8 * no_cls)


def test_aad_averages_over_queries_and_keeps_heads_apart():
    d = analyze.patch_distances(2, 2, 1)
    w = torch.eye(4, dtype=torch.float64).repeat(1, 2, 1, 1)  # (1, 2, 4, 4)
    w[0, 0, 0] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # head 0: query 0 looks at the opposite corner only
    w[0, 1] = torch.tensor([0.0, 0.5, 0.5, 0.0]).expand(4, 4)  # head 1: every query splits over patches 1 and 2
    out = analyze.attention_distance(maps_from_patch_weights(w), d)[0]
    assert out[0] == pytest.approx(math.sqrt(2) / 4)
    # head 1: query 0 -> (1 + 1)/2, query 1 -> (0 + sqrt2)/2, query 2 -> (sqrt2 + 0)/2, query 3 -> (1 + 1)/2
    assert out[1] == pytest.approx((1 + math.sqrt(2) / 2 + math.sqrt(2) / 2 + 1) / 4)


def test_aad_of_a_vit_with_uniform_attention():
    """Zero q/k projections make every softmax row uniform over the 1 + 4 tokens: every layer and head then has the
    2x2-grid mean distance (renorm) or 4/5 of it (zero)."""
    torch.manual_seed(0)
    m = vit.vit('tiny', img_size=32, patch_size=16, num_classes=0).eval()
    D = m.embed_dim
    for blk in m.blocks:
        blk.attn.qkv.weight.data[:2 * D] = 0
        blk.attn.qkv.bias.data[:2 * D] = 0
    maps = m.forward_attention(torch.randn(2, 3, 32, 32))
    d = analyze.patch_distances(2, 2, 16)
    want = torch.full((2, 3), DIAG_2x2 * 16, dtype=torch.float64)
    for a in maps:
        assert torch.allclose(analyze.attention_distance(a, d, 'renorm'), want, atol=1e-5)
        assert torch.allclose(analyze.attention_distance(a, d, 'zero'), 0.8 * want, atol=1e-5)


def test_spectrum_of_a_known_covariance():
    # points +-(3, 0), +-(0, 1): mean 0, unbiased covariance diag(2*9/3, 2*1/3)
    x = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    want = torch.tensor([6.0, 2.0 / 3.0], dtype=torch.float64)
    assert torch.allclose(analyze.covariance_spectrum(*analyze.feature_moments(x)), want)
    # summed over two batches, shifted by a constant, rotated: the same spectrum
    rot = torch.tensor([[math.cos(0.7), -math.sin(0.7)], [math.sin(0.7), math.cos(0.7)]])
    y = x @ rot + torch.tensor([5.0, -2.0])
    m1, m2 = analyze.feature_moments(y[:1]), analyze.feature_moments(y[1:])
    summed = tuple(a + b for a, b in zip(m1, m2))
    assert torch.allclose(analyze.covariance_spectrum(*summed), want, atol=1e-9)


def test_effective_rank():
    assert analyze.effective_rank(torch.ones(4)) == pytest.approx(4)
    assert analyze.effective_rank(torch.tensor([2.0, 0.0, 0.0])) == pytest.approx(1)
    assert analyze.effective_rank(torch.tensor([3.0, 3.0, 0.0, 0.0])) == pytest.approx(2)


def test_query_attention_rows():
    a = torch.zeros(1, 1, 5, 5)
    a[0, 0, 0] = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1])  # [CLS] query
    a[0, 0, 3] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])  # patch 2 looks at patch 3
    assert torch.allclose(analyze.query_attention(a, -1), torch.full((1, 1, 4), 0.25))
    assert torch.allclose(analyze.query_attention(a, 2), torch.tensor([[[0.0, 0.0, 0.0, 1.0]]]))


def test_reconstruct_pastes_the_visible_patches():
    import mae
    torch.manual_seed(0)
    m = mae.MAE(SimpleNamespace(model='tiny', img_size=32, patch_size=8, decoder_dim=32, decoder_depth=1,
                                decoder_heads=2)).eval()
    m.norm_pix = True
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    masked, pasted, pasted_vis = analyze.reconstruct(m, imgs, noise, 0.75)
    keep = noise.argsort(dim=1)[:, :4]  # int(16 * 0.25) smallest noise values are kept
    vis = torch.zeros(2, 16, dtype=torch.bool).scatter_(1, keep, True)
    t, pm, pp, pv = (vit.patchify(x, 8) for x in (imgs, masked, pasted, pasted_vis))
    assert torch.allclose(pm[vis], t[vis]) and torch.all(pm[~vis] == 0)
    assert torch.allclose(pp[vis], t[vis]) and not torch.allclose(pp[~vis], t[~vis])
    assert torch.allclose(pv[vis], t[vis])
    # one normalised prediction, two un-normalisations: with each true patch's mean and std, and with one mean and
    # std per image, the averages of its visible patches' own
    mean, std = t.mean(-1, keepdim=True), (t.var(-1, keepdim=True) + 1e-6) ** 0.5  # (B, L, 1)
    for b in range(2):
        v_mean, v_std = mean[b][vis[b]].mean(), std[b][vis[b]].mean()
        pred_a = (pp[b][~vis[b]] - mean[b][~vis[b]]) / std[b][~vis[b]]  # (12, P)
        pred_b = (pv[b][~vis[b]] - v_mean) / v_std
        assert torch.allclose(pred_a, pred_b, atol=1e-4)
    m.norm_pix = False  # pixel predictions: nothing to un-normalise, the two reconstructions agree
    _, pasted, pasted_vis = analyze.reconstruct(m, imgs, noise, 0.75)
    assert torch.equal(pasted, pasted_vis)


@pytest.fixture(scope='module')
def mae_ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('mae'))
    r = run_script('mae.py', ['--model', 'tiny', '--img_size', '32', '--patch_size', '8', '--batch_size', '8',
                              '--num_workers', '0', '--max_steps', '2', '--log_every', '1', '--out_dir', out])
    assert r.returncode == 0, r.stderr[-3000:]
    return os.path.join(out, 'checkpoint.pt')


PNGS = ('aad.png', 'spectrum.png', 'attn_random.png', 'attn_mae_2.png', 'attn_mae_2-2.png', 'recon.png')
ALL_THREE = ['--what', 'all', '--num_images', '4', '--batch_size', '3', '--num_vis', '2']


def test_end_to_end_without_matplotlib(mae_ckpt, tmp_path, monkeypatch, capsys):
    """matplotlib made unimportable (None in sys.modules): report.md and results.json are written, no PNG, one line
    says how to get them; the progress line of the pass over the images appears when asked for."""
    for name in [m for m in sys.modules if m == 'matplotlib' or m.startswith('matplotlib.')]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    monkeypatch.setenv('NANOMIM_PROGRESS_EVERY', '0')
    out = str(tmp_path / 'an')
    analyze.main(['--checkpoint', 'none', '--checkpoint', mae_ckpt, '--checkpoint', mae_ckpt, '--out_dir', out]
                 + ALL_THREE)
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ['report.md', 'results.json']
    hints = [line for line in printed.splitlines() if 'matplotlib' in line]
    assert len(hints) == 1 and 'pip install matplotlib' in hints[0], hints
    assert 'analyze, 3 checkpoint(s): 3/4 img' in printed and '4/4 img' in printed  # batches of 3 then 1
    assert 'no PNGs (matplotlib is not installed)' in open(os.path.join(out, 'report.md')).read()
    res = json.load(open(os.path.join(out, 'results.json')))
    assert res['img_size'] == 32 and res['num_images'] == 4
    max_dist = math.hypot(3, 3) * 8  # opposite corners of the 4x4 grid
    for label in ('random', 'mae:2'):  # nanoMIM checkpoints are labelled method:step, repeats get -2, -3, ...
        aad = torch.tensor(res['results'][label]['aad'])
        assert aad.shape == (12, 3) and bool((aad > 0).all()) and bool((aad < max_dist).all())
        assert len(res['results'][label]['singular_values'][0]) == 192
    assert res['results']['mae:2-2']['aad'] == res['results']['mae:2']['aad']


def test_end_to_end_pngs_with_matplotlib(mae_ckpt, tmp_path, capsys):
    pytest.importorskip('matplotlib')
    out = str(tmp_path / 'an')
    analyze.main(['--checkpoint', 'none', '--checkpoint', mae_ckpt, '--checkpoint', mae_ckpt, '--out_dir', out]
                 + ALL_THREE)
    assert 'pip install matplotlib' not in capsys.readouterr().out
    assert sorted(os.listdir(out)) == sorted(PNGS + ('report.md', 'results.json'))
    for name in PNGS:
        with open(os.path.join(out, name), 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n', name  # the PNG signature
        im = Image.open(os.path.join(out, name))
        im.verify()  # CRCs and chunk structure
        im = Image.open(os.path.join(out, name)).convert('L')
        w, h = im.size
        assert 300 <= w <= 3000 and 200 <= h <= 3000, (name, im.size)  # readable, not a thumbnail or a poster
        lo, hi = im.getextrema()
        assert hi - lo > 100, name  # drawn on: dark text or lines on a light background
    report = open(os.path.join(out, 'report.md')).read()
    # recon.png: original | masked input (one mask for both: shown once) | mae:2 and mae:2-2 (norm-pix: each with the
    # true patches' and with the visible patches' statistics) (random: no decoder)
    assert ('recon.png columns: original | mae:2 input (75% masked) | mae:2 true stats | mae:2 visible stats | '
            'mae:2-2 true stats | mae:2-2 visible stats') in report


def test_official_mae_layout_gives_the_same_reconstruction(mae_ckpt):
    ck = load_ckpt(os.path.dirname(mae_ckpt))
    official = {(k[len('encoder.'):] if k.startswith('encoder.') else k): v for k, v in ck['model'].items()}
    ours = analyze.build_reconstructor(ck, 32)
    theirs = analyze.build_reconstructor({'model': official, 'config': {'decoder_heads': 4}}, 32)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    for a, b in zip(analyze.reconstruct(ours, imgs, noise, 0.75), analyze.reconstruct(theirs, imgs, noise, 0.75)):
        assert torch.allclose(a, b, atol=1e-5)


def test_layers_and_zero_mode(mae_ckpt, tmp_path):
    out = str(tmp_path / 'an')
    analyze.main(['--checkpoint', mae_ckpt, '--layers', '11,12', '--cls_key', 'zero', '--num_images', '2',
                  '--out_dir', out])
    report = open(os.path.join(out, 'report.md')).read()
    assert '| 11 |' in report and '| 12 |' in report and '| 10 |' not in report and '[CLS] key: zero' in report


def test_bad_input_is_one_error_line(tmp_path):
    with pytest.raises(SystemExit, match='error: checkpoint .* does not exist'):
        analyze.main(['--checkpoint', str(tmp_path / 'missing.pt')])
    with pytest.raises(SystemExit, match='error: --what recon needs a checkpoint with a pixel decoder'):
        analyze.main(['--checkpoint', 'none', '--what', 'recon', '--num_images', '1', '--out_dir', str(tmp_path)])
    with pytest.raises(SystemExit, match='error: --attn_query'):
        analyze.main(['--img_size', '32', '--what', 'attn', '--attn_query', '16', '--out_dir', str(tmp_path)])
    with pytest.raises(SystemExit):
        analyze.main(['--what', 'pictures'])
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a checkpoint')
    r = run_script('analyze.py', ['--checkpoint', str(bad), '--out_dir', str(tmp_path)])
    assert r.returncode == 1 and r.stderr.strip().startswith('error: cannot read checkpoint')
    assert 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1
