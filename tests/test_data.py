"""data.py: the embedded dataset, image folders (bad files, modes), every script's transform under the per-sample
seeding (the method files' own included), the block mask, seeding and sampling, the uint8 loader path, --decode gpu
(packed batches, batched crops, corrupt files) and the worker count."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import dtm
import finetune
import ibot
import lut


def test_shapes_deterministic_balanced_and_masks_match_labels():
    ds = data.Shapes('train', 32, with_mask=True, length=40)
    img, label, mask = ds[7]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and mask.shape == (32, 32)
    img2, _, _ = data.Shapes('train', 32, with_mask=True)[7]
    assert torch.equal(img, img2)
    assert set(mask.unique().tolist()) == {0, label + 1}  # background and the one object's class
    assert not torch.equal(img, data.Shapes('val', 32)[7][0])  # splits differ
    counts = np.bincount(data.Shapes('train', 32).targets, minlength=10)
    assert counts.min() == counts.max() == 500



def shape_descriptor(mask):
    """Rotation- and scale-invariant numbers of one binary mask (H, W): solidity (area / area of the convex hull of
    the pixel squares), moment of inertia about the centroid / that of a disk of the same area (1 for a disk),
    smaller / larger eigenvalue of the pixel covariance (1 for any shape with 90-degree symmetry), and the farthest
    pixel from the centroid / the radius of the disk of the same area."""
    ys, xs = np.nonzero(mask)
    area = len(xs)
    d = np.stack([xs - xs.mean(), ys - ys.mean()])  # (2, area)
    ev = np.linalg.eigvalsh(d @ d.T / area)  # ascending
    pts = sorted({(x + a, y + b) for x, y in zip(xs.tolist(), ys.tolist()) for a in (0, 1) for b in (0, 1)})

    def half(points):  # Andrew's monotone chain, one half of the hull
        h = []
        for p in points:
            while len(h) >= 2 and ((h[-1][0] - h[-2][0]) * (p[1] - h[-2][1])
                                   - (h[-1][1] - h[-2][1]) * (p[0] - h[-2][0])) <= 0:  # no left turn
                h.pop()
            h.append(p)
        return h[:-1]
    hull = np.array(half(pts) + half(pts[::-1]), dtype=float)
    hull_area = 0.5 * abs(np.dot(hull[:, 0], np.roll(hull[:, 1], 1)) - np.dot(hull[:, 1], np.roll(hull[:, 0], 1)))
    return np.array([area / hull_area, 2 * np.pi * ev.sum() / area, ev[0] / ev[1],
                     np.sqrt((d ** 2).sum(0).max()) / np.sqrt(area / np.pi)])


def test_shape_descriptor_by_hand():
    """A 10 x 10 square: solidity 1, inertia 2 pi (99 / 6) / 100 over 1, eigenvalue ratio 1, farthest pixel
    centre 4.5 sqrt 2 from the centroid against sqrt(100 / pi)."""
    m = np.zeros((16, 16), bool)
    m[3:13, 3:13] = True
    want = [1, 2 * np.pi * 99 / 6 / 100, 1, 4.5 * 2 ** 0.5 / (100 / np.pi) ** 0.5]
    np.testing.assert_allclose(shape_descriptor(m), want)


def test_every_pair_of_shape_classes_differs_beyond_rotation_and_scale():
    """No class is another turned and scaled: for every pair, some rotation- and scale-invariant number of the
    rendered masks takes disjoint ranges on the two classes (with a gap), over ~20 images of each at random
    rotation, size and position (masks that touch the border are clipped and left out). A square turned 45 degrees
    (the former `diamond`) overlaps the square in all four."""
    found = {c: [] for c in range(len(data.SHAPE_CLASSES))}
    for i in range(300):
        _, label, mask = data.render_shape(i, 64)
        m = mask > 0
        if not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()):
            found[label].append(shape_descriptor(m))
    desc = {c: np.stack(v) for c, v in found.items()}
    assert min(len(v) for v in desc.values()) >= 10
    names = data.SHAPE_CLASSES
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            lo = np.maximum(desc[a].min(0), desc[b].min(0))
            hi = np.minimum(desc[a].max(0), desc[b].max(0))
            gap = (lo - hi) / np.maximum(desc[a].max(0), desc[b].max(0))  # > 0: disjoint ranges, relative gap
            assert gap.max() > 0.01, f'{names[a]} and {names[b]} overlap in every invariant: gaps {gap.round(3)}'



def test_image_grid_caption_lines_and_colour_key(tmp_path):
    """Two caption lines and a title row above the grid, a key of colour swatches below it: each swatch's colour is
    drawn under the grid, and the image grows by one 14-px line per caption line and key line."""
    imgs = torch.full((2, 3, 64, 64), 0.5)
    data.save_image_grid(imgs, 2, tmp_path / 'a.png', ('x', 'y'), caption='one')
    data.save_image_grid(imgs, 2, tmp_path / 'b.png', ('x', 'y'), caption='one\ntwo',
                         key=[('red', (255, 0, 0)), ('green', (0, 200, 0))])
    a, b = (np.array(Image.open(tmp_path / n).convert('RGB')) for n in ('a.png', 'b.png'))
    assert b.shape[1] == a.shape[1] and b.shape[0] == a.shape[0] + 14 + 14 + 4
    below = b[14 * 3 + 2 + (64 + 4) * 2:]  # under the caption, titles and the grid (2 px padding, 2x enlarged)
    for rgb in ((255, 0, 0), (0, 200, 0)):
        assert (below == rgb).all(-1).sum() >= 9 * 9, rgb

def write_images(root):
    (root / 'a').mkdir(parents=True)
    (root / 'b').mkdir()
    Image.new('RGB', (20, 16), (255, 0, 0)).save(root / 'a' / '0.png')
    Image.new('L', (20, 16), 128).save(root / 'a' / '1.jpg')  # grayscale
    Image.new('CMYK', (20, 16), (0, 255, 0, 0)).save(root / 'b' / '2.jpg')
    Image.new('RGBA', (20, 16), (0, 0, 255, 0)).save(root / 'b' / '3.png')  # fully transparent -> white
    (root / 'b' / '4.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg')


def test_image_folder_modes_and_corrupt_file(tmp_path, capsys):
    write_images(tmp_path)
    ds = data.ImageFolder(str(tmp_path))
    assert ds.classes == ['a', 'b'] and len(ds) == 5
    for i in range(4):
        assert ds[i][0].mode == 'RGB'
    assert ds[3][0].getpixel((0, 0)) == (255, 255, 255)
    capsys.readouterr()
    img, label = ds[4]  # the corrupt file is skipped: the next readable image comes instead
    assert img.mode == 'RGB' and ds.num_bad == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith('warning: skipping unreadable image') and '4.jpg' in err[0]
    ds[4]
    assert capsys.readouterr().err == '' and ds.num_bad == 1  # one line per bad file, not per visit


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        data.build_dataset(str(tmp_path / 'missing'))
    with pytest.raises(ValueError, match='no class sub-folders'):
        data.build_dataset(str(tmp_path))
    (tmp_path / 'c').mkdir()
    with pytest.raises(ValueError, match='holds no images'):
        data.build_dataset(str(tmp_path))


def test_imagenet_layout_uses_split_folder(tmp_path):
    write_images(tmp_path / 'train')
    ds = data.build_dataset(str(tmp_path), 'train')
    assert len(ds) == 5


@pytest.mark.parametrize('name', ['mae', 'lut', 'ibot', 'dtm', 'finetune', 'eval'])
def test_transform_shapes_dtypes_and_determinism(name):
    tf = {'mae': data.mae_transform(32), 'lut': lut.LUTTransform(32), 'ibot': ibot.MultiCropTransform(32, 16, 3),
          'dtm': dtm.dtm_transform(32), 'finetune': finetune.finetune_transform(32),
          'eval': data.eval_transform(32)}[name]
    ds = data.Seeded(data.Shapes('train', 40, length=8), tf)
    out, label = ds[(3, 99)]
    views = list(out) if isinstance(out, (list, tuple)) else [out]
    n_expected = {'lut': 2, 'ibot': 5}.get(name, 1)
    assert len(views) == n_expected
    for v in views:
        assert v.dtype == torch.float32 and v.shape[0] == 3 and v.shape[1] == v.shape[2] and v.shape[1] in (16, 32)
        assert -3 < v.mean() < 3
    again, _ = ds[(3, 99)]
    again = list(again) if isinstance(again, (list, tuple)) else [again]
    assert all(torch.equal(a, b) for a, b in zip(views, again))  # same seed, same augmentation
    if name != 'eval':
        other, _ = ds[(3, 100)]
        other = list(other) if isinstance(other, (list, tuple)) else [other]
        assert not all(torch.equal(a, b) for a, b in zip(views, other))


def test_block_masks():
    rng = np.random.default_rng(0)
    counts = [data.block_mask(14, 14, 75, rng).sum() for _ in range(200)]
    assert max(counts) <= 75 and min(counts) >= 16
    m = data.block_mask(14, 14, 30, np.random.default_rng(3))
    assert m.dtype == bool and m.shape == (14, 14)


def test_block_mask_small_remainder_draws_small_blocks():
    """remaining < min_patches: the area is drawn between the two (uniform(16, 3) lies in [3, 16]), so a block of
    at most 3 new cells can still be placed and the mask reaches its target; a clamp to 16 could not place one."""
    hits = [data.block_mask(14, 14, 3, np.random.default_rng(s), min_patches=16).sum() for s in range(200)]
    assert max(hits) <= 3 and np.mean([h == 3 for h in hits]) > 0.2


def test_sampler_partitions_and_eval_counts_once():
    tr = [data.EpochSampler(103, 8, world=2, rank=r, seed=1) for r in range(2)]
    for s in tr:
        s.set_epoch(3)
    a, b = [i for i, _ in tr[0]], [i for i, _ in tr[1]]
    assert len(a) == len(b) == 48 and not set(a) & set(b)
    ev = [data.EpochSampler(103, 8, world=2, rank=r, shuffle=False, drop_last=False) for r in range(2)]
    seen = sorted(i for s in ev for i, _ in s)
    assert seen == list(range(103))
    s = data.EpochSampler(103, 8, seed=1)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, skip=16)
    assert list(s) == full[16:]
    s.set_epoch(3)
    assert list(s) != full
    with pytest.raises(ValueError, match='smaller than one global batch'):
        data.EpochSampler(10, 8, world=2)


def test_batches_resume_matches_uninterrupted():
    ds = data.Seeded(data.Shapes('train', 16, length=40), data.mae_transform(16))
    loader, sampler = data.make_loader(ds, 8, seed=0)  # 5 batches per epoch
    full = [b[1][0] for _, b in zip(range(8), data.batches(loader, sampler, 0))]
    loader, sampler = data.make_loader(ds, 8, seed=0)
    tail = [b[1][0] for _, b in zip(range(5), data.batches(loader, sampler, 3))]
    assert all(torch.equal(x, y) for x, y in zip(full[3:], tail))


def write_idx(path, arr):
    import gzip
    header = bytes([0, 0, 8, arr.ndim]) + np.array(arr.shape, dtype='>i4').tobytes()
    with (gzip.open if str(path).endswith('.gz') else open)(path, 'wb') as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_reader_and_dataset(tmp_path):
    imgs = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    write_idx(tmp_path / 'train-images-idx3-ubyte.gz', imgs)
    write_idx(tmp_path / 'train-labels-idx1-ubyte', np.array([2, 0, 1]))
    assert np.array_equal(data.read_idx(str(tmp_path / 'train-images-idx3-ubyte.gz')), imgs)
    ds = data.build_dataset(f'idx:{tmp_path}', 'train', img_size=4)
    assert len(ds) == 3 and ds.targets == [2, 0, 1] and ds.classes == ['0', '1', '2']
    x, y = ds[1]
    assert x.shape == (3, 4, 4) and x.dtype == torch.uint8 and y == 0
    assert torch.equal(x[0], torch.from_numpy(imgs[1])) and torch.equal(x[0], x[2])  # grey copied to 3 channels
    assert data.build_dataset(f'idx:{tmp_path}', 'train', img_size=8)[0][0].shape == (3, 8, 8)
    with pytest.raises(FileNotFoundError, match='t10k-images-idx3-ubyte'):
        data.build_dataset(f'idx:{tmp_path}', 'val')
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'x').write_bytes(b'\x00\x00\x0d\x01abc')
    with pytest.raises(ValueError, match='not a uint8 idx file'):
        data.read_idx(str(tmp_path / 'bad' / 'x'))


def test_missing_idx_package_names_the_package(monkeypatch):
    monkeypatch.setitem(data.IDX_SOURCES, 'fashion-mnist', ('/nonexistent/fmnist', 'apt-get install -y dataset-fashion-mnist'))
    with pytest.raises(FileNotFoundError, match='apt-get install -y dataset-fashion-mnist'):
        data.build_dataset('fashion-mnist')


# uint8 from the workers, normalised on the device by data.to_device


def test_to_device_normalises_a_flat_image_by_hand():
    # a flat (255, 128, 0) image: every crop of it is that colour; normalised by hand with ImageNet's mean and std
    img = torch.tensor([255, 128, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 6, 5).contiguous()
    torch.manual_seed(0)
    u8 = data.mae_transform(4, normalize=False)(img)
    assert u8.dtype == torch.uint8 and torch.equal(u8, img[:, :4, :4])
    x = data.to_device(u8[None], 'cpu')  # (1, 3, 4, 4) float32
    hand = torch.tensor([(1 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0 - 0.406) / 0.225])  # 2.249 0.211 -1.804
    assert x.dtype == torch.float32 and torch.allclose(x[0], hand.view(3, 1, 1).expand(3, 4, 4), atol=1e-6)
    with pytest.raises(TypeError, match='uint8'):
        data.to_device(x, 'cpu')  # already normalised: refused rather than normalised twice


def views(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


@pytest.mark.parametrize('name', ['mae', 'lut', 'ibot', 'dtm', 'eval'])
def test_uint8_path_equals_float_path(name):
    # the same sample key draws the same augmentation either way; uint8 + to_device equals ToDtype + Normalize in
    # the worker exactly (fine-tuning stays float: its random erasing fills normalised noise)
    make = {'mae': lambda n: data.mae_transform(32, normalize=n), 'lut': lambda n: lut.LUTTransform(32, normalize=n),
            'ibot': lambda n: ibot.MultiCropTransform(32, 16, 2, normalize=n),
            'dtm': lambda n: dtm.dtm_transform(32, normalize=n),
            'eval': lambda n: data.eval_transform(32, normalize=n)}[name]
    base = data.Shapes('train', 40, length=4)
    old, new = data.Seeded(base, make(True)), data.Seeded(base, make(False))
    for key in [(1, 5), (3, 99)]:
        for x, u in zip(views(old[key][0]), views(new[key][0]), strict=True):
            assert u.dtype == torch.uint8 and x.dtype == torch.float32
            y = data.to_device(u, 'cpu')
            assert torch.equal(y, x)


# --decode gpu: bytes + crop boxes from the workers, decode + crop + flip by gpu_decode_batch (run here on the CPU)


def write_jpegs(root):
    """a/0.jpg: 40x30, left half red, right half blue; a/1.jpg: 64x48, top green, bottom white; b/2.jpg: 52x44
    smooth random colours. Quality 95 without chroma subsampling, so flat blocks stay flat."""
    (root / 'a').mkdir(parents=True)
    (root / 'b').mkdir()
    img = Image.new('RGB', (40, 30), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 30))
    img.save(root / 'a' / '0.jpg', quality=95, subsampling=0)
    img = Image.new('RGB', (64, 48), (255, 255, 255))
    img.paste((0, 255, 0), (0, 0, 64, 24))
    img.save(root / 'a' / '1.jpg', quality=95, subsampling=0)
    grid = (np.random.default_rng(0).random((4, 5, 3)) * 255).astype(np.uint8)
    Image.fromarray(grid).resize((52, 44), Image.BICUBIC).save(root / 'b' / '2.jpg', quality=95)


def pil_resized_crop(img, box, size):
    """The CPU path's pixels: PIL crop + BICUBIC resize (what mae_transform does to a PIL image), uint8 (3, S, S)."""
    top, left, h, w = box
    out = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)


def decode(ds, idx, boxes, flips, size=16):
    packed = data.pack([ds[i][0] for i in idx])
    return data.gpu_decode_batch(packed, torch.tensor(boxes), torch.tensor(flips), size, 'cpu')


LEVELS = 1  # grey levels: on the CPU both paths decode with libjpeg; Pillow's fixed-point resize rounds differently


def diff(a, b):
    return (a.float() - b.float()).abs()


def test_resize_taps_pillow_formula_by_hand():
    # a crop of length 4 at offset 3 -> 2 pixels: scale 2, the cubic (a = -0.5) stretched x2, support 4. Output 0 is
    # centred at 1.0 in the crop, taps 0..3 at distances (x + 0.5 - 1) / 2 = -0.25, 0.25, 0.75, 1.25:
    # cubic = 0.8671875, 0.8671875, 0.2265625, -0.0703125, sum 1.890625; output 1 (centre 3.0) is its mirror image
    idx, w = data.resize_taps(torch.tensor([3]), torch.tensor([4]), 2, taps=5)
    k = torch.tensor([0.8671875, 0.8671875, 0.2265625, -0.0703125]) / 1.890625
    W = torch.zeros(2, 10).scatter_add_(1, idx[0], w[0])  # dense (2, 10) over an axis of 10 pixels
    assert torch.allclose(W[0, 3:7], k) and torch.allclose(W[1, 3:7], k.flip(0))
    assert W[:, :3].abs().sum() == 0 and W[:, 7:].abs().sum() == 0  # nothing outside the crop
    # upscaling 2 -> 4: no stretch (support 2); output 0 at 0.25 sees pixels 0, 1 (centres 0.5, 1.5) at distances
    # 0.25, 1.25: cubic 0.8671875, -0.0703125, sum 0.796875
    idx, w = data.resize_taps(torch.tensor([0]), torch.tensor([2]), 4, taps=5)
    W = torch.zeros(4, 2).scatter_add_(1, idx[0], w[0])
    assert torch.allclose(W[0], torch.tensor([0.8671875, -0.0703125]) / 0.796875)
    assert torch.allclose(W.sum(1), torch.ones(4))


def test_resized_crops_match_pillow_on_the_same_pixels():
    # batched resize of boxes in images of several sizes (one bucket or several) == Pillow per image, within LEVELS
    rng = np.random.default_rng(0)
    sizes = [(37, 53), (37, 53), (40, 30), (90, 70), (21, 25), (37, 53)]
    imgs = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in sizes]
    boxes = [[0, 0, 37, 53], [4, 9, 20, 30], [3, 2, 30, 27], [5, 7, 80, 41], [1, 2, 8, 9], [36, 50, 1, 3]]
    x = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in imgs]  # (3, H, W) uint8
    ref = torch.stack([pil_resized_crop(Image.fromarray(a), b, 16) for a, b in zip(imgs, boxes)])
    out = data.resized_crops(x, torch.tensor(boxes), 16).round().clamp(0, 255)  # (6, 3, 16, 16)
    assert diff(out, ref).max() <= LEVELS and diff(out, ref).mean() < 0.05
    for bucket in (8, 1000):  # many buckets (padding inside each) or one: the same pixels
        with pytest.MonkeyPatch.context() as m:
            m.setattr(data, 'RESIZE_BUCKET', bucket)
            assert torch.allclose(data.resized_crops(x, torch.tensor(boxes), 16).round().clamp(0, 255), out)


def test_pack_one_tensor_per_batch(tmp_path):
    write_images(tmp_path)  # PNG, greyscale JPEG, CMYK JPEG, transparent PNG: bytes for the JPEG, pixels otherwise
    ds = data.EncodedFolder(str(tmp_path))
    encs = [ds[i][0] for i in range(4)]
    p = data.pack(encs)
    assert p.data.dtype == torch.uint8 and p.data.ndim == 1 and p.offsets.dtype == torch.int64
    assert p.offsets.tolist() == [0, 960, 960 + len(encs[1].data), 960 + len(encs[1].data) + 960, p.data.numel()]
    assert p.decoded.tolist() == [[16, 20], [0, 0], [16, 20], [16, 20]] and p.paths == [s for s, _ in ds.samples[:4]]
    for k, e in enumerate(encs):
        assert torch.equal(p.data[p.offsets[k]:p.offsets[k + 1]], e.data.reshape(-1))
    ((packed, boxes, flips), _), labels = data.collate_encoded(
        [(((e, torch.tensor([0, 0, 16, 20]), torch.tensor(False)), torch.zeros(4)), 0) for e in encs])
    assert isinstance(packed, data.Packed) and torch.equal(packed.data, p.data) and boxes.shape == (4, 4)


FD_CHECK = '''
import resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
sys.path.insert(0, {root!r})
import data
ds = data.Seeded(data.EncodedFolder({folder!r}), data.WithNoise(data.CropFlipParams(8), 4))
loader, sampler = data.make_loader(ds, 512, num_workers=2, collate_fn=data.collate_encoded)
for epoch in range(2):
    sampler.set_epoch(epoch)
    for ((packed, boxes, flips), noise), labels in loader:
        assert len(packed.offsets) == 513 and len(packed.paths) == 512 and boxes.shape == (512, 4)
        print('batch', epoch, packed.data.numel(), flush=True)
'''


def test_batches_of_512_jpegs_cross_two_workers_at_ulimit_1024(tmp_path):
    # each tensor sent by a worker holds a file descriptor until received: B byte tensors per batch, two workers
    # with a batch each in flight, ran out of descriptors at ulimit -n 1024 and the loader hung. Packed: a handful.
    import subprocess
    import sys
    from conftest import ROOT
    rng = np.random.default_rng(0)
    for k in range(1024):
        (tmp_path / f'c{k % 2}').mkdir(exist_ok=True)
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(tmp_path / f'c{k % 2}' / f'{k}.jpg')
    code = FD_CHECK.format(root=ROOT, folder=str(tmp_path))
    try:
        r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f'the loader hung at ulimit -n 1024: {e.stderr}')
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('batch') == 4 and 'Too many open files' not in r.stderr


def test_gpu_decode_full_box_matches_pil(tmp_path):
    write_jpegs(tmp_path)
    ds = data.EncodedFolder(str(tmp_path))
    assert all(ds[i][0].data.ndim == 1 for i in range(3))  # JPEGs travel as bytes
    assert [ds[i][0].size for i in range(3)] == [(30, 40), (48, 64), (44, 52)]  # (H, W) from the header
    boxes = [[0, 0, 30, 40], [0, 0, 48, 64], [0, 0, 44, 52]]
    out = decode(ds, [0, 1, 2], boxes, [False] * 3)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.uint8
    for i in range(3):
        assert diff(out[i], pil_resized_crop(data.load_rgb(ds.samples[i][0]), boxes[i], 16)).max() <= LEVELS


def test_gpu_decode_box_selects_and_flip_mirrors(tmp_path):
    write_jpegs(tmp_path)
    ds = data.EncodedFolder(str(tmp_path))
    red, blue = torch.tensor([255, 0, 0]).view(3, 1, 1), torch.tensor([0, 0, 255]).view(3, 1, 1)
    left = decode(ds, [0], [[0, 0, 30, 18]], [False])[0]  # left 18 of 40 columns: all red
    assert diff(left, red).max() <= 25
    whole, flipped = decode(ds, [0, 0], [[0, 0, 30, 40]] * 2, [False, True])
    assert torch.equal(flipped, whole.flip(-1))
    assert diff(whole[:, :, :6], red).max() <= 25 and diff(flipped[:, :, :6], blue).max() <= 25
    top = decode(ds, [1], [[4, 10, 16, 40]], [False])[0]  # inside the green top half
    assert diff(top, torch.tensor([0, 255, 0]).view(3, 1, 1)).max() <= 25


def test_gpu_path_matches_cpu_path_per_sample(tmp_path):
    # same (seed, epoch, index) key: the same crop box, flip and MAE noise on both paths, so the same pixels
    write_jpegs(tmp_path)
    cpu = data.Seeded(data.ImageFolder(str(tmp_path)), data.WithNoise(data.mae_transform(16, normalize=False), 4))
    gpu = data.Seeded(data.EncodedFolder(str(tmp_path)), data.WithNoise(data.CropFlipParams(16), 4))
    keys = [(i, 7 * i + s) for s in range(4) for i in range(3)]
    ((packed, boxes, flips), noise), labels = data.collate_encoded([gpu[k] for k in keys])
    assert isinstance(packed, data.Packed) and boxes.shape == (12, 4) and flips.dtype == torch.bool
    assert labels.tolist() == [0, 0, 1] * 4 and 0 < flips.sum() < 12
    imgs = data.gpu_decode_batch(packed, boxes, flips, 16, 'cpu')
    ref_imgs, ref_noise = map(torch.stack, zip(*[cpu[k][0] for k in keys]))
    assert torch.equal(noise, ref_noise)
    assert imgs.dtype == ref_imgs.dtype == torch.uint8 and diff(imgs, ref_imgs).max() <= LEVELS


def test_gpu_path_params_are_pure_functions_of_seed_epoch_index(tmp_path):
    write_jpegs(tmp_path)
    ds = data.Seeded(data.EncodedFolder(str(tmp_path)), data.WithNoise(data.CropFlipParams(16), 4))
    loader, sampler = data.make_loader(ds, 3, seed=5, collate_fn=data.collate_encoded)

    def epoch(e):
        sampler.set_epoch(e)
        ((packed, boxes, flips), noise), labels = next(iter(loader))
        return packed.data, boxes, flips, noise
    a, b, c = epoch(0), epoch(0), epoch(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not (torch.equal(a[1], c[1]) and torch.equal(a[3], c[3]))


def test_gpu_path_decodes_non_jpegs_on_the_cpu(tmp_path, capsys):
    write_images(tmp_path)  # PNG, greyscale JPEG, CMYK JPEG, transparent PNG, corrupt JPEG
    ds = data.build_dataset(str(tmp_path), encoded=True)
    assert isinstance(ds, data.EncodedFolder)
    encs = [ds[i][0] for i in range(4)]
    assert [e.data.ndim for e in encs] == [3, 1, 3, 3]  # only the greyscale JPEG goes to the device as bytes
    out = data.gpu_decode_batch(data.pack(encs), torch.tensor([[0, 0, 16, 20]] * 4), torch.zeros(4, dtype=torch.bool),
                                8, 'cpu')
    for i in range(4):
        assert diff(out[i], pil_resized_crop(data.load_rgb(ds.samples[i][0]), (0, 0, 16, 20), 8)).max() <= LEVELS
    assert ds[4][0].size == (16, 20)  # the corrupt file is skipped, like ImageFolder
    assert '4.jpg' in capsys.readouterr().err
    with pytest.raises(ValueError, match='--decode gpu'):
        data.build_dataset('shapes', encoded=True)

def write_truncated_jpeg(path):
    """A JPEG cut short inside its image data (an interrupted copy): its header reads, its pixels do not decode."""
    img = Image.fromarray((np.random.default_rng(1).random((30, 40, 3)) * 255).astype(np.uint8))
    img.save(path, quality=90)
    raw = path.read_bytes()
    path.write_bytes(raw[:raw.index(b'\xff\xda') + 20])


def test_gpu_decode_skips_a_corrupt_jpeg_with_a_warning(tmp_path):
    write_jpegs(tmp_path)
    write_truncated_jpeg(tmp_path / 'a' / '0-bad.jpg')  # sorted first in class a
    ds = data.EncodedFolder(str(tmp_path))
    assert ds.samples[0][0].endswith('0-bad.jpg') and ds[0][0].size == (30, 40)  # the worker reads its header
    boxes = [[0, 0, 30, 40], [0, 0, 30, 40], [4, 10, 16, 40], [0, 0, 44, 52]]
    with pytest.warns(UserWarning, match='skipping undecodable image .*0-bad.jpg'):
        out = decode(ds, [1, 0, 2, 3], boxes, [False] * 4)  # the bad one in the middle of the batch
    assert out.shape == (4, 3, 16, 16) and torch.equal(out[1], out[2])  # the next decodable image took its place
    assert torch.equal(out[0], decode(ds, [1], boxes[:1], [False])[0])  # the others are untouched
    with pytest.raises(RuntimeError, match='no image of the batch decodes'):
        decode(ds, [0, 0], boxes[:2], [False, True])


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device (nvJPEG)')
def test_cuda_decode_matches_cpu_path(tmp_path):
    # nvJPEG and libjpeg may differ: torchvision's own test bounds their mean difference by 2 grey levels; the crop
    # and resize add at most one level (the CPU test above), so: mean |diff| < 2 levels, and the corrupt file skipped
    write_jpegs(tmp_path)
    write_truncated_jpeg(tmp_path / 'a' / '0-bad.jpg')
    cpu = data.Seeded(data.ImageFolder(str(tmp_path)), data.WithNoise(data.mae_transform(16, normalize=False), 4))
    gpu = data.Seeded(data.EncodedFolder(str(tmp_path)), data.WithNoise(data.CropFlipParams(16), 4))
    keys = [(i, 7 * i + s) for s in range(4) for i in range(1, 4)]
    ((packed, boxes, flips), _), _ = data.collate_encoded([gpu[k] for k in keys])
    imgs = data.gpu_decode_batch(packed, boxes, flips, 16, 'cuda')
    assert imgs.is_cuda and imgs.dtype == torch.uint8
    ref = torch.stack([cpu[k][0][0] for k in keys])
    assert diff(imgs.cpu(), ref).mean() < 2
    x = data.to_device(imgs, 'cuda')
    assert x.is_cuda and torch.allclose(x.cpu(), data.to_device(imgs.cpu(), 'cpu'))
    ((packed, boxes, _), _), _ = data.collate_encoded([gpu[(0, 0)], gpu[(1, 0)]])  # the corrupt file, then 0.jpg
    with pytest.warns(UserWarning, match='0-bad.jpg'):
        out = data.gpu_decode_batch(packed, boxes, torch.zeros(2, dtype=torch.bool), 16, 'cuda')
    assert torch.equal(out[0], out[1])


# loader: workers and pinned memory


def test_default_workers_and_loader_cap(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2})
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    assert data.cpus() == 3
    assert [data.default_workers(n) for n in (0, 1, 2, 3, 10)] == [0, 1, 2, 3, 3]
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')  # torchrun, two processes sharing the 3 CPUs
    assert [data.default_workers(n) for n in (0, 1, 10)] == [0, 1, 1]
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '8')  # more processes than CPUs: still a worker each
    assert data.default_workers(10) == 1
    ds = data.Shapes('train', 8, length=16)
    with pytest.warns(UserWarning, match='lowered to 3'):
        loader, _ = data.make_loader(ds, 4, num_workers=10)
    assert loader.num_workers == 3 and loader.pin_memory == torch.cuda.is_available()
    loader, _ = data.make_loader(ds, 4, num_workers=2, pin_memory=False)
    assert loader.num_workers == 2 and not loader.pin_memory


def impulse_std(img):
    """Standard deviation (px) of a blurred vertical line's horizontal profile (the 1-D impulse response)."""
    p = np.asarray(img, dtype=np.float64)[img.shape[0] // 2]
    x = np.arange(len(p))
    p = p / p.sum()
    return float(np.sqrt((((x - (x * p).sum()) ** 2) * p).sum()))


@pytest.mark.parametrize('size', [96, 224])  # iBOT's local crops; iBOT's global crops and LUT's views
def test_blur_matches_pil_gaussian_blur_on_an_impulse(size):
    """The official augmentation is PIL's ImageFilter.GaussianBlur(radius=sigma), sigma ~ U(0.1, 2): the blurred
    impulse of ours (data.GaussianBlur, the transform every view uses) has the std of PIL's within 3% at every sigma
    from 0.3 px (below, both leave an 8-bit line nearly as it is) to 2 px; a kernel of 10% of a 96-px crop gave 1.85
    px where PIL gives 2.0."""
    from PIL import ImageFilter
    line = np.zeros((size, size), np.uint8)
    line[:, size // 2] = 255
    for sigma in (0.3, 0.5, 0.75, 1.0, 1.5, 2.0):
        pil = impulse_std(np.asarray(Image.fromarray(line).filter(ImageFilter.GaussianBlur(radius=sigma))))
        ours = impulse_std(data.GaussianBlur((sigma, sigma))(torch.from_numpy(line)[None])[0].numpy())
        assert abs(ours / pil - 1) < 0.03, f'{size} px, sigma {sigma}: ours {ours:.3f} px, PIL {pil:.3f} px'
        exact = impulse_std(data.blur(torch.from_numpy(line)[None].float(), sigma)[0].numpy())
        assert abs(exact - sigma) < 1e-3 * sigma  # before 8-bit rounding: variance sigma^2, as PIL's box blur is built


def test_val_folder_labelled_by_the_training_classes(tmp_path, capsys):
    """val/ lacking one of train/'s classes keeps every label (no shift); a val class train lacks is one error; an
    empty class folder is named in one line."""
    for split, classes in (('train', 'abcd'), ('val', 'acd')):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new('RGB', (8, 8), (10 * ord(c), 0, 0)).save(tmp_path / split / c / f'{c}.png')
    train = data.build_dataset(str(tmp_path), 'train')
    val = data.build_dataset(str(tmp_path), 'val', classes=train.classes)
    assert train.classes == val.classes == ['a', 'b', 'c', 'd'] and val.absent == ['b']
    assert [(os.path.basename(p), y) for p, y in val.samples] == [('a.png', 0), ('c.png', 2), ('d.png', 3)]
    (tmp_path / 'val' / 'e').mkdir()
    with pytest.raises(ValueError, match=r'class folder\(s\) e not among the 4 training classes'):
        data.build_dataset(str(tmp_path), 'val', classes=train.classes)
    (tmp_path / 'val' / 'e').rmdir()
    (tmp_path / 'train' / 'e').mkdir()
    (tmp_path / 'train' / 'f').mkdir()
    capsys.readouterr()
    train = data.build_dataset(str(tmp_path), 'train')
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].endswith('2 empty class folder(s) (no image files): e, f')
    assert train.absent == ['e', 'f']


def test_folder_of_unreadable_files(tmp_path, capsys):
    """Only unreadable files: one line per file, then one error before any training (here and in a script)."""
    (tmp_path / 'a').mkdir()
    for i in range(3):
        (tmp_path / 'a' / f'{i}.jpg').write_bytes(b'not a jpeg')
    with pytest.raises(ValueError, match=r'no readable image in data folder .* \(3 files, none opens'):
        data.ImageFolder(str(tmp_path))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith('warning: skipping unreadable image') for line in err)
    import mae
    with pytest.raises(SystemExit, match='^error: no readable image in data folder'):
        mae.main(['--data', str(tmp_path), '--num_workers', '0'])


def test_batch_larger_than_the_data_names_the_flag_and_regime(tmp_path):
    (tmp_path / 'a').mkdir()
    for i in range(12):
        Image.new('RGB', (8, 8)).save(tmp_path / 'a' / f'{i}.png')
    import mae
    with pytest.raises(SystemExit, match=r'dataset of 12 images is smaller than one global batch \(--batch_size 512 '
                                         r'x 1 process\): pass a smaller --batch_size \(the folder regime picks 512\)'):
        mae.main(['--data', str(tmp_path), '--num_workers', '0'])


def test_warmup_line(capsys):
    assert not data.warn_warmup(0, 5, '--warmup_epochs 0') and not data.warn_warmup(4, 5, '--warmup_epochs 1')
    assert data.warn_warmup(5, 5, '--warmup_epochs 1') and data.warn_warmup(30, 5, '--warmup_iters 30')
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].startswith('warning: the warm-up (--warmup_iters 30: 30 steps) is as long as this '
                                               'run (5 steps) or longer')
