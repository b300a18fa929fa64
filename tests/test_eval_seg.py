"""eval_seg.py: metric, label conventions, joint transforms, pyramid shapes, sliding windows, schedules, data
readers, distributed confusion matrices, and short end-to-end runs (CPU, tiny)."""
import json
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from PIL import Image
from torchvision import tv_tensors

import eval_seg as es
import vit
from conftest import load_ckpt, run_script

TINY = ['--model', 'tiny', '--img_size', '32', '--patch_size', '8', '--batch_size', '4', '--num_workers', '0', '--channels', '16',
        '--log_every', '2', '--val_size', '5']

# -----------------------------------------------------------------------------
# metric


def test_confusion_matrix_and_miou_hand_computed():
    label = torch.tensor([0, 0, 0, 1, 1, 2, 2, 255, 255])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 0, 2, 0])  # the last two sit on ignore pixels
    cm = es.confusion_matrix(pred, label, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 1]]  # rows ground truth, columns prediction
    m = es.seg_metrics(cm)
    # IoU = tp / (gt + pred - tp): 2/(3+3-2), 1/(2+2-1), 1/(2+2-1)
    assert m['iou'] == pytest.approx([50.0, 100 / 3, 100 / 3])
    assert m['mIoU'] == pytest.approx((1 / 2 + 1 / 3 + 1 / 3) / 3 * 100)
    assert m['aAcc'] == pytest.approx(4 / 7 * 100)
    assert m['mAcc'] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3 * 100)


def test_absent_classes_excluded_but_false_positives_count():
    label = torch.tensor([0, 0, 1, 1])
    # class 2 absent from both prediction and label: NaN, not in the mean
    m = es.seg_metrics(es.confusion_matrix(torch.tensor([0, 0, 1, 1]), label, 3))
    assert math.isnan(m['iou'][2]) and m['mIoU'] == pytest.approx(100.0)
    # class 2 predicted but never labelled: IoU 0, in the mean
    m = es.seg_metrics(es.confusion_matrix(torch.tensor([0, 2, 1, 1]), label, 3))
    assert m['iou'] == pytest.approx([50.0, 100.0, 0.0]) and m['mIoU'] == pytest.approx(50.0)


def test_seg_loss_ignores_pixels_and_weights_aux():
    C = 5
    target = torch.tensor([[[0, 1], [255, 4]]])
    zeros = torch.zeros(1, C, 2, 2)  # uniform prediction: log C per labelled pixel, 3 labelled of 4
    # mmseg CrossEntropyLoss (avg_non_ignore=False): the ignored pixel counts as 0 in a mean over all 4 pixels
    assert es.seg_loss(zeros, target).item() == pytest.approx(3 / 4 * math.log(C))
    assert es.seg_loss(zeros, target, zeros, 0.4).item() == pytest.approx(1.4 * 3 / 4 * math.log(C))
    logits = zeros.clone()
    logits[0, 3, 1, 0] = 100.0  # a confident prediction on the ignored pixel changes nothing
    assert es.seg_loss(logits, target).item() == pytest.approx(3 / 4 * math.log(C))
    ref = nn.functional.cross_entropy(logits, target, ignore_index=255, reduction='none').mean()
    assert es.seg_loss(logits, target).item() == pytest.approx(ref.item())  # mmseg's reduction, as written there
    assert es.seg_loss(zeros, torch.full((1, 2, 2), 255)).item() == 0.0  # all ignored: 0, not NaN


def test_reduce_zero_label():
    m = torch.tensor([[0, 1, 2], [150, 255, 7]])
    assert es.reduce_zero_label(m).tolist() == [[255, 0, 1], [149, 255, 6]]


def test_palette_is_the_voc_colour_map():
    pal = es.palette()
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0] and pal[2].tolist() == [0, 128, 0]
    assert pal[15].tolist() == [192, 128, 128] and pal[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in pal.tolist()}) == 256

# -----------------------------------------------------------------------------
# joint transforms


def blocky_pair(size=64, block=16, seed=0):
    """An image whose red channel encodes a class per 16x16 block (never 0), and the mask read from it."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(0, 10, (size // block, size // block), generator=g)
    mask = cls.repeat_interleave(block, 0).repeat_interleave(block, 1)  # (S, S)
    img = torch.stack([mask * 20 + 30, torch.full_like(mask, 77), (mask * 7) % 50 + 100]).to(torch.uint8)
    return tv_tensors.Image(img), tv_tensors.Mask(mask)


def interior(mask, k=5):
    """Pixels whose k x k neighbourhood holds one label: away from block edges, where resampling blends classes."""
    m = mask[None, None].float()
    hi = nn.functional.max_pool2d(m, k, 1, k // 2)
    lo = -nn.functional.max_pool2d(-m, k, 1, k // 2)
    return (hi == lo)[0, 0]


def test_train_transform_keeps_image_and_mask_aligned():
    t = es.SegTrainTransform(64, cat_max_ratio=1.0)
    seen_small, seen_flip = False, False
    for seed in range(12):
        torch.manual_seed(seed)
        img, mask = t.geometry(blocky_pair(seed=seed))
        assert img.shape[-2:] == mask.shape and max(mask.shape) <= 64 and mask.dtype == torch.int64
        seen_small |= min(mask.shape) < 64
        inner = interior(mask)
        assert inner.sum() > 0.3 * mask.numel()
        derived = ((img[0].float() - 30) / 20).round().long()  # the class read back from the image
        assert torch.equal(derived[inner], mask[inner]), seed
        seen_flip |= not torch.equal(derived.flip(-1)[inner], mask[inner])
    assert seen_small and seen_flip  # some draws shrank the image below the crop; a flip would have been noticed
    # the full transform: normalized image padded at the bottom / right with 0 (the mean colour after
    # normalization, mmseg Pad after Normalize) where the mask is padded with ignore; the mask untouched otherwise
    for seed in range(12):
        torch.manual_seed(seed)
        x, y = t(blocky_pair(seed=seed))
        torch.manual_seed(seed)
        _, y2 = t.geometry(blocky_pair(seed=seed))
        h, w = y2.shape
        assert x.dtype == torch.float32 and x.shape == (3, 64, 64) and y.shape == (64, 64)
        assert torch.equal(y[:h, :w], y2) and (y[h:] == 255).all() and (y[:, w:] == 255).all()
        assert (x[:, h:] == 0).all() and (x[:, :, w:] == 0).all()


def test_crop_avoids_one_class_crops():
    # mmseg RandomCrop(cat_max_ratio=0.75): a crop where one class holds >= 75% of the labelled pixels is drawn
    # again (up to 10 times). A 64 px mask of class 1 with a 16 x 64 band of class 2 at the top: 32 px crops
    # keep the band in 17 of 33 row offsets; only those with >= 9 band rows pass (class 1 < 75%)
    mask = torch.ones(64, 64, dtype=torch.long)
    mask[:16] = 2
    t, t1 = es.SegTrainTransform(32), es.SegTrainTransform(32, cat_max_ratio=1.0)
    ok = lambda top: 16 - top >= 9  # rows of the band in the crop starting at `top`
    torch.manual_seed(0)
    hits = sum(ok(t.crop_box(mask)[0]) for _ in range(300))
    hits1 = sum(ok(t1.crop_box(mask)[0]) for _ in range(300))
    assert hits1 / 300 == pytest.approx(8 / 33, abs=0.07) and hits / 300 > 0.9


def test_photometric_distortion_is_mmsegs_brightness_and_contrast(monkeypatch):
    # brightness adds U(-32, 32), contrast multiplies by U(0.5, 1.5) (no blend with the mean); uint8 truncation
    img = torch.tensor([[[10, 100, 250]]], dtype=torch.uint8).expand(3, 1, 3).clone()
    draws = iter([0.1, 0.9, 0.9, 0.9, 0.9])  # brightness on; contrast last; saturation, hue, contrast off
    monkeypatch.setattr(torch, 'rand', lambda *a, **k: torch.tensor(next(draws)))
    torch.manual_seed(0)
    beta = torch.empty(()).uniform_(-32, 32).item()
    torch.manual_seed(0)
    out = es.PhotoMetricDistortion()(img)
    want = (img.float() + beta).clamp(0, 255).to(torch.uint8)
    assert torch.equal(out, want)
    draws = iter([0.9, 0.1, 0.1, 0.9, 0.9])  # brightness off; contrast first, on; saturation, hue off
    torch.manual_seed(0)
    alpha = torch.empty(()).uniform_(0.5, 1.5).item()
    torch.manual_seed(0)
    out = es.PhotoMetricDistortion()(img)
    assert torch.equal(out, (img.float() * alpha).clamp(0, 255).to(torch.uint8))


def test_a_misaligned_pair_would_be_caught():
    img, mask = blocky_pair()
    derived = ((img[0].float() - 30) / 20).round().long()
    assert torch.equal(derived, mask)
    assert (derived.flip(-1) == mask).float().mean() < 0.5  # flipping one of the two breaks the agreement


def test_eval_transform_resizes_the_image_only():
    img, mask = blocky_pair(size=64)
    img = tv_tensors.Image(img[:, :, :48])  # (3, 64, 48): shorter side 48
    mask = tv_tensors.Mask(mask[:, :48])
    x, y = es.SegEvalTransform(32)((img, mask))
    assert x.shape == (3, 42, 32) and torch.equal(y, mask)

# -----------------------------------------------------------------------------
# model


def test_tokens_to_map_is_row_major():
    B, h, w, D = 2, 3, 4, 5
    t = torch.arange(B * (1 + h * w) * D).float().reshape(B, 1 + h * w, D)
    m = es.tokens_to_map(t, h, w)
    assert m.shape == (B, D, h, w)
    for r, c in [(0, 0), (1, 2), (2, 3)]:
        assert torch.equal(m[:, :, r, c], t[:, 1 + r * w + c])


@pytest.mark.parametrize('img, patch', [(32, 8), (64, 16)])
def test_pyramid_strides_and_shapes(img, patch):
    cfg = es.get_config(['--checkpoint', 'none', '--img_size', str(img), '--patch_size', str(patch), '--channels', '16'])
    model = es.Segmenter(cfg, 11).eval()
    x = torch.randn(2, 3, img, img)
    feats = model.features(x)
    assert [f.shape for f in feats] == [(2, 192, img // patch, img // patch)] * 4
    levels = model.pyramid(feats)
    strides = [img // lv.shape[-1] for lv in levels]
    assert strides == [patch // 4, patch // 2, patch, 2 * patch]  # 4, 8, 16, 32 for patch 16
    assert all(lv.shape[:2] == (2, 192) and lv.shape[-1] == lv.shape[-2] for lv in levels)
    logits, aux = model(x)
    assert logits.shape == (2, 11, img, img) and aux is None
    model.train()
    logits, aux = model(x)
    assert aux.shape == (2, 11, img, img)


def test_features_are_the_tapped_blocks():
    cfg = es.get_config(['--checkpoint', 'none', '--img_size', '32', '--patch_size', '8', '--layers', '1,2,3,5'])
    model = es.Segmenter(cfg, 3).eval()
    x = torch.randn(1, 3, 32, 32)
    bb = model.backbone
    t = bb.with_cls(bb.embed(x))
    expect = []
    for i, blk in enumerate(bb.blocks[:5], start=1):
        t = blk(t)
        if i in (1, 2, 3, 5):
            expect.append(t[0, 1:].T.reshape(192, 4, 4))
    with torch.no_grad():
        for f, e in zip(model.features(x), expect):
            torch.testing.assert_close(f[0], e)
    # blocks after the last tapped one and the unused final norm get no gradient: frozen
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert 'backbone.blocks.4.attn.qkv.weight' in trained and 'backbone.pos_embed' in trained
    assert not any(n.startswith(('backbone.blocks.5.', 'backbone.blocks.11.', 'backbone.norm.')) for n in trained)


def test_linear_probe_is_ibots():
    # iBOT configs/linear: frozen backbone, the 4 tapped blocks' patch tokens after the final norm concatenated
    # (4 x 192 channels), one 1x1 conv (FCNHead num_convs 0, no BatchNorm, dropout 0), upsampled bilinearly
    cfg = es.get_config(['--checkpoint', 'none', '--img_size', '32', '--patch_size', '8', '--head', 'linear'])
    model = es.Segmenter(cfg, 4).eval()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {'cls.weight', 'cls.bias'} and model.cls.weight.shape == (4, 4 * 192, 1, 1)
    x = torch.randn(2, 3, 32, 32)
    bb, t, taps = model.backbone, None, []
    t = bb.with_cls(bb.embed(x))
    for i, blk in enumerate(bb.blocks, start=1):
        t = blk(t)
        if i in (4, 6, 8, 12):
            taps.append(es.tokens_to_map(bb.norm(t), 4, 4))
    want = nn.functional.interpolate(model.cls(torch.cat(taps, 1)), size=(32, 32), mode='bilinear')
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], want)


def test_parse_layers_scales_to_depth():
    assert es.parse_layers('', 12) == [4, 6, 8, 12]
    assert es.parse_layers('', 24) == [8, 12, 16, 24]
    assert es.parse_layers('3,5,7,11', 12) == [3, 5, 7, 11]
    for bad in ('1,2,3', '4,4,6,8', '4,6,8,13', 'a,b,c,d'):
        with pytest.raises(ValueError):
            es.parse_layers(bad, 12)

# -----------------------------------------------------------------------------
# inference


def test_window_starts():
    assert es.window_starts(512, 512, 341) == [0]
    assert es.window_starts(683, 512, 341) == [0, 171]  # last window flush with the edge
    assert es.window_starts(1024, 512, 341) == [0, 341, 512]
    for n in (512, 600, 853, 1500):
        s = es.window_starts(n, 512, 341)
        covered = torch.zeros(n, dtype=torch.bool)
        for a in s:
            covered[a:a + 512] = True
        assert covered.all() and s[-1] + 512 == n and all(0 <= b - a <= 341 for a, b in zip(s, s[1:]))


class PixelModel(nn.Module):
    """A per-pixel classifier (1x1 conv): any window sees the same logits at a pixel, so slide == whole."""

    def __init__(self, C, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, C, 1)

    def forward(self, x):
        return self.conv(x), None


def test_slide_inference_averages_overlapping_windows():
    cfg = es.get_config(['--checkpoint', 'none', '--img_size', '32', '--patch_size', '8', '--stride', '12'])
    model = PixelModel(4)
    x = torch.randn(2, 3, 45, 70)  # 2 x 4 windows, overlapping; not a multiple of the patch size
    slide = es.predict(model, x, 4, cfg)
    with torch.no_grad():
        torch.testing.assert_close(slide, model(x)[0])
    cfg.eval_mode = 'whole'
    torch.testing.assert_close(es.predict(model, x, 4, cfg), slide)
    small = torch.randn(1, 3, 20, 24)  # smaller than the window: padded, then cut back
    cfg.eval_mode = 'slide'
    assert es.predict(model, small, 4, cfg).shape == (1, 4, 20, 24)

# -----------------------------------------------------------------------------
# optimizer and schedule


def test_layer_decay_groups():
    cfg = es.get_config(['--checkpoint', 'none', '--img_size', '32', '--patch_size', '8', '--channels', '16'])
    model = es.Segmenter(cfg, 3)
    groups = es.param_groups(model, 0.05, 0.5, 12)
    scale = {id(p): g['lr_scale'] for g in groups for p in g['params']}
    wd = {id(p): g['weight_decay'] for g in groups for p in g['params']}
    named = dict(model.named_parameters())
    assert scale[id(named['backbone.patch_embed.proj.weight'])] == 0.5 ** 13
    # the BEiT / MAE / iBOT segmentation constructor decays [CLS] and the position embedding (its exemption list
    # names 'pos_embed' / 'cls_token', never equal to the 'backbone.'-prefixed names)
    assert scale[id(named['backbone.pos_embed'])] == 0.5 ** 13 and wd[id(named['backbone.pos_embed'])] == 0.05
    assert wd[id(named['backbone.cls_token'])] == 0.05
    assert scale[id(named['backbone.blocks.0.mlp.fc1.weight'])] == 0.5 ** 12
    assert scale[id(named['backbone.blocks.11.attn.qkv.weight'])] == 0.5
    assert scale[id(named['decode.cls.weight'])] == 1.0 and wd[id(named['decode.cls.weight'])] == 0.05
    assert wd[id(named['decode.cls.bias'])] == 0.0 and wd[id(named['backbone.blocks.3.norm1.weight'])] == 0.0
    assert len(scale) == sum(p.requires_grad for p in model.parameters())  # every trained parameter, once


def test_poly_schedule_with_warmup():
    assert es.lr_at(0, 1e-4, 0.0, 100, 1000) == 0.0
    assert es.lr_at(50, 1e-4, 0.0, 100, 1000) == pytest.approx(1e-4 * 0.95 * 0.5)
    assert es.lr_at(100, 1e-4, 0.0, 100, 1000) == pytest.approx(1e-4 * 0.9)  # end of warm-up: the poly value
    assert es.lr_at(550, 1e-4, 0.0, 100, 1000) == pytest.approx(0.45e-4)
    assert es.lr_at(1000, 1e-4, 1e-6, 100, 1000) == pytest.approx(1e-6)

# -----------------------------------------------------------------------------
# data readers


def write_voc(root, sizes=((40, 48), (36, 52), (48, 40), (44, 44)), names=('_background_', 'cat', 'dog'),
              splits=None, extra_label=None):
    """A tiny VOC tree: JPEGImages/*.jpg, SegmentationClassPNG/*.png palette PNGs (0..2 and 255 borders)."""
    os.makedirs(os.path.join(root, 'JPEGImages'))
    os.makedirs(os.path.join(root, 'SegmentationClassPNG'))
    rng = np.random.default_rng(0)
    pal = es.palette().reshape(-1).tolist()
    for k, (h, w) in enumerate(sizes):
        lab = np.zeros((h, w), np.uint8)
        lab[h // 4:3 * h // 4, : w // 2] = 1
        lab[h // 4:3 * h // 4, w // 2:] = 2
        lab[h // 4, :] = 255  # VOC's ignore border
        if extra_label is not None and k == 0:
            lab[0, 0] = extra_label
        c = np.where(lab == 255, 0, lab).astype(np.int64)
        img = np.stack([c * 80, 255 - c * 60, rng.integers(0, 60, (h, w))], -1).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(root, 'JPEGImages', f'im{k}.jpg'))
        m = Image.fromarray(lab, mode='P')
        m.putpalette(pal)
        m.save(os.path.join(root, 'SegmentationClassPNG', f'im{k}.png'))
    if names:
        with open(os.path.join(root, 'class_names.txt'), 'w') as f:
            f.write('\n'.join(names) + '\n')
    if splits:
        os.makedirs(os.path.join(root, 'ImageSets', 'Segmentation'))
        for s, stems in splits.items():
            with open(os.path.join(root, 'ImageSets', 'Segmentation', f'{s}.txt'), 'w') as f:
                f.write('\n'.join(stems) + '\n')


def test_voc_reader(tmp_path):
    root = str(tmp_path / 'voc')
    write_voc(root, extra_label=9)
    ds = es.build_seg_dataset(f'voc:{root}', 'train', 32)
    assert len(ds) == 4 and ds.num_classes == 3 and ds.classes[1] == 'cat'
    with pytest.warns(UserWarning, match='ignored'):
        (img, mask), i = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 40, 48) and mask.shape == (40, 48)
    assert set(mask.unique().tolist()) == {0, 1, 2, 255} and mask[0, 0] == 255  # 9 >= 3 classes -> ignore
    assert mask[20, 10] == 1 and mask[20, 40] == 2 and (mask[10] == 255).all()
    # split files pick the images; no class_names.txt -> the 21 VOC classes
    root2 = str(tmp_path / 'voc2')
    write_voc(root2, names=None, splits={'train': ['im0', 'im2'], 'val': ['im3']})
    tr, va = es.build_seg_dataset(f'voc:{root2}', 'train', 32), es.build_seg_dataset(f'voc:{root2}', 'val', 32)
    assert len(tr) == 2 and len(va) == 1 and tr.num_classes == 21
    assert va.pairs[0][0].endswith('im3.jpg')


def test_ade20k_reader(tmp_path):
    root = tmp_path / 'ADEChallengeData2016'
    for sub in ('training', 'validation'):
        (root / 'images' / sub).mkdir(parents=True)
        (root / 'annotations' / sub).mkdir(parents=True)
    lab = np.array([[0, 1, 150], [2, 0, 3]], np.uint8)
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(root / 'images' / 'training' / 'a.jpg')
    Image.fromarray(lab, mode='L').save(root / 'annotations' / 'training' / 'a.png')
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(root / 'images' / 'training' / 'b.jpg')  # no label: skipped
    ds = es.build_seg_dataset(str(tmp_path), 'train', 32)
    assert len(ds) == 1 and ds.num_classes == 150
    (_, mask), _ = ds[0]
    assert mask.tolist() == [[255, 0, 149], [1, 255, 2]]
    with pytest.raises(ValueError, match='no image'):
        es.build_seg_dataset(str(root), 'val', 32)
    with pytest.raises(FileNotFoundError, match='layout'):
        es.build_seg_dataset(str(tmp_path / 'ADEChallengeData2016' / 'images'), 'train', 32)

# -----------------------------------------------------------------------------
# distributed evaluation: the all-reduced per-rank confusion matrices equal the single-process one


def _eval_rank(rank, world, init_file, out):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    torch.set_num_threads(1)
    cm = _eval_cm(world, rank)
    if rank == 0:
        torch.save(cm, out)
    dist.destroy_process_group()


def _eval_cm(world, rank):
    """evaluate() on 7 embedded validation images (an odd count: no padding duplicates allowed) with a fixed model."""
    cfg = es.get_config(['--checkpoint', 'none', '--img_size', '32', '--patch_size', '8', '--batch_size', '2'])
    val = torch.utils.data.Subset(es.ShapesSeg('val', 32), range(7))
    loader, _ = es.data.make_loader(es.data.Seeded(val, es.SegEvalTransform(32)), 2, world, rank, 0, 0, train=False,
                                    collate_fn=es.collate_lists)
    _, cm = es.evaluate(PixelModel(11), loader, 11, cfg, 'cpu', es.nullcontext())
    return cm


def test_distributed_confusion_matrix_equals_single_process(tmp_path):
    out = str(tmp_path / 'cm.pt')
    mp.spawn(_eval_rank, args=(2, str(tmp_path / 'init'), out), nprocs=2, join=True)
    cm2, cm1 = torch.load(out), _eval_cm(1, 0)
    assert cm1.sum() == 7 * 32 * 32  # every pixel of every image once, no ignore in the embedded masks
    assert torch.equal(cm2, cm1)

# -----------------------------------------------------------------------------
# end to end


@pytest.fixture(scope='module')
def tiny_ckpt():
    """A nanoMIM-format checkpoint of a tiny/8 backbone pre-trained at 64 px (its position embedding is interpolated)."""
    d = tempfile.mkdtemp()
    torch.manual_seed(0)
    enc = vit.vit('tiny', img_size=64, patch_size=8, num_classes=0)
    path = os.path.join(d, 'pre.pt')
    torch.save({'method': 'mae', 'encoder': vit.backbone_state_dict(enc)}, path)
    return path, enc


def test_cli_on_a_voc_folder(tmp_path, tiny_ckpt):
    root = str(tmp_path / 'voc')
    write_voc(root)
    out = str(tmp_path / 'out')
    r = run_script('eval_seg.py', ['--data', f'voc:{root}', '--checkpoint', tiny_ckpt[0], '--iters', '4',
                                   '--out_dir', out] + TINY)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert 'loaded' in r.stdout and 'eval step 4: mIoU' in r.stdout
    ck = load_ckpt(out)
    assert ck['method'] == 'seg' and ck['step'] == 4 and ck['num_classes'] == 3
    assert {'model', 'optimizer', 'scaler', 'config', 'encoder'} <= set(ck)
    assert ck['encoder']['pos_embed'].shape == (1, 1 + 16, 192)  # 32 px / patch 8
    assert not torch.equal(ck['encoder']['blocks.0.attn.qkv.weight'], tiny_ckpt[1].blocks[0].attn.qkv.weight)
    recs = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    ev = [r for r in recs if 'mIoU' in r]
    assert len(ev) == 1 and len(ev[0]['iou']) == 3 and 0 <= ev[0]['mIoU'] <= 100
    assert math.isfinite(recs[0]['loss'])
    assert Image.open(os.path.join(out, 'seg.png')).size[0] > 3 * 32



def test_seg_png_has_a_colour_key_the_step_and_the_miou(tmp_path, tiny_ckpt, monkeypatch):
    """seg.png's caption names the step and the mIoU just measured; its key maps the colour of every label drawn
    (ground truth: background, cat, dog and the ignore border) to its class name in the VOC palette."""
    root = str(tmp_path / 'voc')
    write_voc(root)
    out = str(tmp_path / 'out')
    calls = []
    monkeypatch.setattr(es.data, 'save_image_grid', lambda images, ncol, path, titles=(), caption='', key=():
                        calls.append((caption, [(n, tuple(int(c) for c in rgb)) for n, rgb in key])))
    es.main(['--data', f'voc:{root}', '--checkpoint', tiny_ckpt[0], '--iters', '2', '--out_dir', out] + TINY)
    miou = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))][-1]['mIoU']
    caption, key = calls[-1]
    assert caption.startswith(f'step 2, mIoU {miou:.2f} on ')
    pal = es.palette()
    want = {'_background_': 0, 'cat': 1, 'dog': 2, 'ignore': 255}
    assert {n: tuple(int(c) for c in pal[i]) for n, i in want.items()}.items() <= dict(key).items()


def test_resume_equals_uninterrupted(tmp_path, tiny_ckpt, capsys):
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    common = ['--checkpoint', tiny_ckpt[0], '--iters', '4', '--save_every', '2'] + TINY
    es.main(common + ['--out_dir', a])
    assert 'warning: the warm-up (--warmup_iters 30: 30 steps) is as long as this run (4 steps)' in \
        capsys.readouterr().out  # the embedded default warm-up is longer than these 4 iterations
    es.main(common + ['--out_dir', b, '--max_steps', '2'])
    assert load_ckpt(b)['step'] == 2
    es.main(common + ['--out_dir', b, '--resume', 'auto'])
    ca, cb = load_ckpt(a), load_ckpt(b)
    assert cb['step'] == 4
    for k, v in ca['model'].items():
        torch.testing.assert_close(cb['model'][k], v, msg=k)


def test_ddp_run_scores_like_one_process(tmp_path, torchrun):
    """2 gloo ranks train and score 7 images (3 + 4); one process scoring the saved model gets the same per-class IoU
    (the ranks' summed confusion matrices, scored with rank 0's BatchNorm statistics, equal one process's)."""
    out, again = str(tmp_path / 'ddp'), str(tmp_path / 'again')
    args = ['--checkpoint', 'none', '--iters', '3'] + TINY[:-1] + ['7']
    torchrun('eval_seg.py', args + ['--out_dir', out])
    es.main(['--eval_only', 'true', '--resume', os.path.join(out, 'checkpoint.pt'), '--out_dir', again] + args)
    ddp, one = [[json.loads(line) for line in open(os.path.join(d, 'log.jsonl')) if 'mIoU' in line][-1] for d in (out, again)]
    assert ddp['step'] == one['step'] == 3
    for k in ('mIoU', 'mAcc', 'aAcc'):
        assert ddp[k] == pytest.approx(one[k], abs=1e-9)
    np.testing.assert_allclose(ddp['iou'], one['iou'], atol=1e-9)  # NaN (absent classes) in the same places


def test_bad_input_is_one_line(tmp_path):
    r = run_script('eval_seg.py', ['--checkpoint', str(tmp_path / 'nope.pt')] + TINY + ['--out_dir', str(tmp_path / 'o')])
    assert r.returncode != 0 and 'does not exist' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-1500:]
    for args, msg in [(['--checkpoint', 'none', '--data', str(tmp_path / 'nodata')], 'does not exist'),
                      (['--checkpoint', 'none', '--data', f'voc:{tmp_path}'], 'JPEGImages'),
                      (['--resume', str(tmp_path / 'nope.pt')], 'cannot read')]:
        with pytest.raises(SystemExit, match=msg):
            es.main(args + TINY + ['--out_dir', str(tmp_path / 'o')])
    for args in ([], ['--checkpoint', 'none', '--head', 'fcn'], ['--checkpoint', 'none', '--layers', '4,6,8']):
        with pytest.raises(SystemExit):
            es.get_config(args)  # argparse: usage line + one error line


def test_dtm_checkpoint_features_equal_in_eval_seg_finetune_and_dtm(tmp_path):
    # a DTM checkpoint carries layer scale (ls1.gamma / ls2.gamma): every evaluation script must build the backbone
    # with it, so its tapped block outputs equal those of dtm.py's own encoder
    import dtm
    import finetune
    pre = str(tmp_path / 'dtm')
    args = ['--model', 'tiny', '--img_size', '32', '--patch_size', '8', '--batch_size', '8', '--num_workers', '0']
    dtm.main(args + ['--max_steps', '1', '--out_dir', pre])
    path = os.path.join(pre, 'checkpoint.pt')
    ck = load_ckpt(pre)
    assert 'blocks.0.ls1.gamma' in ck['encoder']
    own = dtm.DTM(dtm.get_config(args))
    own.load_state_dict(ck['model'])
    own = own.encoder.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = [es.tokens_to_map(t, 4, 4) for t in own.forward_intermediates(x, [4, 6, 8, 12])]
        cfg = es.get_config(args + ['--checkpoint', path, '--channels', '16'])
        seg = es.Segmenter(cfg, 3, es.pretrained_backbone(cfg, verbose=False)).eval()
        assert cfg.out_norm == 0  # a DTM checkpoint: raw block outputs, as MAE / BEiT
        for got, w in zip(seg.features(x), want):
            torch.testing.assert_close(got, w)
        ft = finetune.build_backbone(finetune.get_config(args + ['--mode', 'knn', '--checkpoint', path]), 10, False)
        torch.testing.assert_close(ft.eval().forward_features(x), own.forward_features(x))
        # the bug this guards against: a ViT without layer scale takes the same file with the gammas left out
        plain = vit.vit('tiny', img_size=32, patch_size=8, num_classes=0).eval()
        vit.load_backbone(ck, plain, verbose=False)
        err = (plain.forward_intermediates(x, [12])[0] - own.forward_intermediates(x, [12])[0]).norm()
        assert err > 0.1 * own.forward_intermediates(x, [12])[0].norm()


def test_evaluation_scripts_build_the_checkpoints_vit(tmp_path, capsys):
    """No --model / --patch_size / --img_size: eval_seg, finetune and analyze take them from the checkpoint (ViT-mini
    /4 trained at 16 px), and without --data say or take the data it was trained on."""
    import analyze
    import finetune
    path = str(tmp_path / 'mini.pt')
    enc = vit.backbone_state_dict(vit.vit('mini', img_size=16, patch_size=4, num_classes=0))
    torch.save({'method': 'mae', 'encoder': enc, 'config': {'data': 'fashion-mnist', 'img_size': 16}}, path)
    cfg = es.get_config(['--checkpoint', path])
    assert (cfg.model, cfg.patch_size, cfg.img_size, cfg.data) == ('mini', 4, 16, '')
    assert cfg.notes == ['data: the embedded shapes with their masks; the checkpoint was pre-trained on --data '
                         'fashion-mnist, which has no segmentation masks here']
    assert es.get_config(['--checkpoint', path, '--img_size', '32']).img_size == 32
    cfg = finetune.get_config(['--mode', 'knn', '--checkpoint', path])
    assert (cfg.model, cfg.patch_size, cfg.img_size, cfg.data) == ('mini', 4, 16, 'fashion-mnist')
    torch.save({'method': 'mae', 'encoder': enc, 'config': {'data': str(tmp_path), 'img_size': 16}}, path)
    cfg = finetune.get_config(['--mode', 'knn', '--checkpoint', path])
    assert (cfg.model, cfg.patch_size, cfg.img_size, cfg.data) == ('mini', 4, 16, '')
    assert cfg.notes[0].startswith(f'data: the embedded shapes; the checkpoint was pre-trained on --data {tmp_path}')
    with pytest.raises(SystemExit, match=r"asked for width 192, depth 12, patch 4 \(--model tiny\): drop --model tiny"):
        finetune.build_backbone(finetune.get_config(['--mode', 'knn', '--checkpoint', path, '--model', 'tiny']), 10)
    analyze.main(['--checkpoint', path, '--what', 'aad', '--num_images', '2', '--out_dir', str(tmp_path / 'a')])
    assert 'ViT-mini patch 4 at 16 px' in capsys.readouterr().out
