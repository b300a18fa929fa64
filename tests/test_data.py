"""data.py: the embedded dataset, image folders (bad files, modes), transforms, masks, seeding and sampling, the
worker count."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import data


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


def write_images(root):
    (root / 'a').mkdir(parents=True)
    (root / 'b').mkdir()
    Image.new('RGB', (20, 16), (255, 0, 0)).save(root / 'a' / '0.png')
    Image.new('L', (20, 16), 128).save(root / 'a' / '1.jpg')  # grayscale
    Image.new('CMYK', (20, 16), (0, 255, 0, 0)).save(root / 'b' / '2.jpg')
    Image.new('RGBA', (20, 16), (0, 0, 255, 0)).save(root / 'b' / '3.png')  # fully transparent -> white
    (root / 'b' / '4.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg')


def test_image_folder_modes_and_corrupt_file(tmp_path):
    write_images(tmp_path)
    ds = data.ImageFolder(str(tmp_path))
    assert ds.classes == ['a', 'b'] and len(ds) == 5
    for i in range(4):
        assert ds[i][0].mode == 'RGB'
    assert ds[3][0].getpixel((0, 0)) == (255, 255, 255)
    with pytest.warns(UserWarning, match='4.jpg'):
        img, label = ds[4]  # the corrupt file is skipped: the next readable image comes instead
    assert img.mode == 'RGB' and ds.num_bad == 1


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
    tf = {'mae': data.mae_transform(32), 'lut': data.LUTTransform(32), 'ibot': data.MultiCropTransform(32, 16, 3),
          'dtm': data.dtm_transform(32), 'finetune': data.finetune_transform(32), 'eval': data.eval_transform(32)}[name]
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


def test_lut_views_share_geometry():
    # on a flat-colour image with a bright square, photometric changes keep the square where it is
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    img[:, 4:12, 20:28] = 255
    tf = data.LUTTransform(32)
    torch.manual_seed(1)
    v1, v2 = tf(img)
    d1 = (v1 - v1.mean()).abs().sum(0)
    d2 = (v2 - v2.mean()).abs().sum(0)
    assert (d1 > d1.mean()).eq(d2 > d2.mean()).float().mean() > 0.9


def test_random_masking_invariants():
    torch.manual_seed(0)
    noise = torch.rand(5, 49)
    ids_shuffle, ids_restore, K = data.random_masking(noise, 0.75)
    assert K == 12
    ar = torch.arange(49).expand(5, -1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), ar)  # ids_restore inverts ids_shuffle
    mask = data.mask_from_ids(ids_shuffle[:, :K], 49)
    assert torch.equal(mask.sum(1), torch.full((5,), 37.0))
    for b in range(5):  # the mask marks exactly the removed set, and kept = the K smallest noise values
        kept = set(ids_shuffle[b, :K].tolist())
        assert kept == set(torch.nonzero(mask[b] == 0).flatten().tolist())
        assert kept == set(noise[b].argsort()[:K].tolist())
    assert len({tuple(sorted(ids_shuffle[b, :K].tolist())) for b in range(5)}) == 5  # per-sample masks differ
    with pytest.raises(ValueError, match='mask ratio'):
        data.random_masking(noise, 1.0)


def test_block_masks():
    rng = np.random.default_rng(0)
    counts = [data.block_mask(14, 14, 75, rng).sum() for _ in range(200)]
    assert max(counts) <= 75 and min(counts) >= 16
    assert all(data.exact_block_mask(14, 14, 75, rng).sum() == 75 for _ in range(100))
    assert all(data.exact_block_mask(8, 8, 24, rng).sum() == 24 for _ in range(100))
    draws = np.array([data.ibot_mask(14, 14, rng).sum() for _ in range(2000)])
    # no-mask probability 0.5: binomial std over 2000 draws is 0.011
    assert abs((draws == 0).mean() - 0.5) < 0.05
    masked = draws[draws > 0]
    assert masked.max() <= 0.5 * 196 and 40 < masked.mean() < 75  # official code: mean about 57.6
    m = data.block_mask(14, 14, 30, np.random.default_rng(3))
    assert m.dtype == bool and m.shape == (14, 14)


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


def pil_reference(path, size):
    """The CPU path on the whole image: PIL decode, bicubic antialiased resize, normalise."""
    tf = v2.Compose([v2.ToImage(), v2.Resize((size, size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])
    return tf(data.load_rgb(path))


def decode(ds, idx, boxes, flips, size=16):
    datas = [ds[i][0].data for i in idx]
    return data.gpu_decode_batch(datas, torch.tensor(boxes), torch.tensor(flips), size, 'cpu')


TOL = 0.05  # about 2.5 grey levels after normalisation: JPEG decoders and uint8 rounding may differ by a level


def test_gpu_decode_full_box_matches_pil(tmp_path):
    write_jpegs(tmp_path)
    ds = data.EncodedFolder(str(tmp_path))
    assert all(ds[i][0].data.ndim == 1 for i in range(3))  # JPEGs travel as bytes
    assert [ds[i][0].size for i in range(3)] == [(30, 40), (48, 64), (44, 52)]  # (H, W) from the header
    out = decode(ds, [0, 1, 2], [[0, 0, 30, 40], [0, 0, 48, 64], [0, 0, 44, 52]], [False] * 3)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    for i in range(3):
        assert (out[i] - pil_reference(ds.samples[i][0], 16)).abs().max() < TOL


def test_gpu_decode_box_selects_and_flip_mirrors(tmp_path):
    write_jpegs(tmp_path)
    ds = data.EncodedFolder(str(tmp_path))
    red, blue = torch.tensor([1., 0, 0]).view(3, 1, 1), torch.tensor([0., 0, 1]).view(3, 1, 1)
    left = data.denormalize(decode(ds, [0], [[0, 0, 30, 18]], [False]))[0]  # left 18 of 40 columns: all red
    assert (left - red).abs().max() < 0.1
    whole, flipped = data.denormalize(decode(ds, [0, 0], [[0, 0, 30, 40]] * 2, [False, True]))
    assert torch.equal(flipped, whole.flip(-1))
    assert (whole[:, :, :6] - red).abs().max() < 0.1 and (flipped[:, :, :6] - blue).abs().max() < 0.1
    top = data.denormalize(decode(ds, [1], [[4, 10, 16, 40]], [False]))[0]  # inside the green top half
    assert (top - torch.tensor([0., 1, 0]).view(3, 1, 1)).abs().max() < 0.1


def test_gpu_path_matches_cpu_path_per_sample(tmp_path):
    # same (seed, epoch, index) key: the same crop box, flip and MAE noise on both paths, so the same pixels
    write_jpegs(tmp_path)
    cpu = data.Seeded(data.ImageFolder(str(tmp_path)), data.WithNoise(data.mae_transform(16), 4))
    gpu = data.Seeded(data.EncodedFolder(str(tmp_path)), data.WithNoise(data.CropFlipParams(16), 4))
    keys = [(i, 7 * i + s) for s in range(4) for i in range(3)]
    ((datas, boxes, flips), noise), labels = data.collate_encoded([gpu[k] for k in keys])
    assert isinstance(datas, list) and boxes.shape == (12, 4) and flips.dtype == torch.bool
    assert labels.tolist() == [0, 0, 1] * 4 and 0 < flips.sum() < 12
    imgs = data.gpu_decode_batch(datas, boxes, flips, 16, 'cpu')
    ref_imgs, ref_noise = map(torch.stack, zip(*[cpu[k][0] for k in keys]))
    assert torch.equal(noise, ref_noise)
    assert (imgs - ref_imgs).abs().max() < TOL


def test_gpu_path_params_are_pure_functions_of_seed_epoch_index(tmp_path):
    write_jpegs(tmp_path)
    ds = data.Seeded(data.EncodedFolder(str(tmp_path)), data.WithNoise(data.CropFlipParams(16), 4))
    loader, sampler = data.make_loader(ds, 3, seed=5, collate_fn=data.collate_encoded)

    def epoch(e):
        sampler.set_epoch(e)
        ((datas, boxes, flips), noise), labels = next(iter(loader))
        return [d.sum().item() for d in datas], boxes, flips, noise
    a, b, c = epoch(0), epoch(0), epoch(1)
    assert a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
    assert not (torch.equal(a[1], c[1]) and torch.equal(a[3], c[3]))


def test_gpu_path_decodes_non_jpegs_on_the_cpu(tmp_path):
    write_images(tmp_path)  # PNG, greyscale JPEG, CMYK JPEG, transparent PNG, corrupt JPEG
    ds = data.build_dataset(str(tmp_path), encoded=True)
    assert isinstance(ds, data.EncodedFolder)
    encs = [ds[i][0] for i in range(4)]
    assert [e.data.ndim for e in encs] == [3, 1, 3, 3]  # only the greyscale JPEG goes to the device as bytes
    out = data.gpu_decode_batch([e.data for e in encs], torch.tensor([[0, 0, 16, 20]] * 4), torch.zeros(4, dtype=torch.bool),
                                8, 'cpu')
    for i in range(4):
        assert (out[i] - pil_reference(ds.samples[i][0], 8)).abs().max() < TOL
    with pytest.warns(UserWarning, match='4.jpg'):
        assert ds[4][0].size == (16, 20)  # the corrupt file is skipped, like ImageFolder
    with pytest.raises(ValueError, match='--decode gpu'):
        data.build_dataset('shapes', encoded=True)


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
