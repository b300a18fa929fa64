"""Every `next:` line a method script prints runs as printed: a 1-step pre-training of each method (a tiny idx data
set, a non-default --model, Fashion-MNIST, the embedded shapes), then the printed finetune.py command, in-process.
The evaluation must build the ViT the checkpoint holds and read the data it was trained on."""
import json
import os
import shlex

import numpy as np
import pytest

import dtm
import finetune
import ibot
import lut
import mae

SMALL = ['--img_size', '16', '--patch_size', '4', '--batch_size', '8', '--num_workers', '0', '--max_steps', '1',
         '--log_every', '1']
ARGS = {
    mae: ['--decoder_dim', '32', '--decoder_depth', '1', '--decoder_heads', '2'],
    lut: ['--decoder_dim', '32', '--decoder_depth', '1', '--decoder_heads', '2', '--head_dim', '64'],
    ibot: ['--local_size', '8', '--local_crops_number', '1', '--out_dim', '64', '--head_hidden', '64'],
    dtm: ['--morph_n', '0'],
}


def write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + np.array(arr.shape, dtype='>i4').tobytes()
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


@pytest.fixture(scope='module')
def tiny_idx(tmp_path_factory):
    """An MNIST-layout set of 40 train / 12 val 12x12 images in 4 classes (a bright square whose place is the class)."""
    root = tmp_path_factory.mktemp('idx')
    rng = np.random.default_rng(0)
    for split, n, (img_name, lab_name) in (('train', 40, ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte')),
                                           ('val', 12, ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'))):
        labels = np.arange(n) % 4
        imgs = rng.integers(0, 60, (n, 12, 12))
        for i, c in enumerate(labels):
            imgs[i, 6 * (c // 2):6 * (c // 2) + 6, 6 * (c % 2):6 * (c % 2) + 6] = 250
        write_idx(root / img_name, imgs)
        write_idx(root / lab_name, labels)
    return f'idx:{root}'


def pretrain_then_next(capsys, module, argv, extra=()):
    """Run module.main(argv); run the `next:` command it printed (plus `extra`, flags that only make it smaller);
    return (pre-training output, the evaluation's first-line config, the evaluation output)."""
    module.main(argv)
    out = capsys.readouterr().out
    line = [s for s in out.splitlines() if s.startswith('next: ')]
    assert len(line) == 1, out[-2000:]
    cmd = shlex.split(line[0][len('next: '):])
    assert cmd[0] == 'python' and os.path.samefile(cmd[1], finetune.__file__), cmd
    finetune.main(cmd[2:] + list(extra))
    ev = capsys.readouterr().out
    assert 'done: kNN top-1' in ev.splitlines()[-1], ev[-2000:]
    return out, json.loads(ev.splitlines()[0]), ev


@pytest.mark.parametrize('module', [mae, lut, ibot, dtm], ids=lambda m: m.__name__)
def test_next_line_runs_as_printed(module, tiny_idx, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the printed command is relative to where the user stands
    out, first, _ = pretrain_then_next(capsys, module, SMALL + ARGS[module] + ['--data', tiny_idx, '--out_dir', 'run'],
                                       ['--out_dir', 'knn'])
    assert (first['data'], first['model'], first['patch_size'], first['img_size']) == (tiny_idx, 'mini', 4, 16)
    assert first['mode'] == 'knn' and first['regime'] == 'small' and 'epochs' not in first  # what knn uses, only
    assert os.path.exists(tmp_path / 'knn' / 'results.json')
    if module is dtm:  # an EMA teacher: the momentum is logged
        steps = [r for r in map(json.loads, open(tmp_path / 'run' / 'log.jsonl')) if 'loss' in r]  # not kNN points
        assert steps and all('momentum' in r for r in steps)


def test_next_line_with_a_frozen_teacher_and_another_model(tiny_idx, tmp_path, capsys):
    """`dtm.py --teacher vit:... --model small`: the evaluation builds ViT-small (no --model in the next line) and a
    frozen teacher logs no momentum."""
    teacher = str(tmp_path / 'teacher')
    mae.main(SMALL + ARGS[mae] + ['--data', tiny_idx, '--out_dir', teacher])
    capsys.readouterr()
    run = str(tmp_path / 'student')
    out, first, ev = pretrain_then_next(capsys, dtm, SMALL + ARGS[dtm] + [
        '--data', tiny_idx, '--model', 'small', '--teacher', f'vit:{teacher}/checkpoint.pt', '--out_dir', run],
        ['--out_dir', str(tmp_path / 'knn')])
    assert (first['model'], first['patch_size'], first['img_size']) == ('small', 4, 16)
    assert 'format: nanoMIM dtm' in ev
    steps = [s for s in out.splitlines() if s.startswith('step ')]
    assert steps and not any('momentum' in s for s in steps)
    records = [r for r in map(json.loads, open(f'{run}/log.jsonl')) if 'loss' in r]  # not kNN points
    assert records and not any('momentum' in r for r in records)


def test_next_line_after_fashion_mnist_and_the_embedded_shapes(tmp_path, capsys):
    """The README's two first runs: --data fashion-mnist (the next line names it; a kNN without --data would take it
    from the checkpoint) and the embedded shapes. The evaluation is cut to a few images by flags added after the
    printed command, which stays valid as printed."""
    if not os.path.isdir('/usr/share/datasets/fashion-mnist'):
        pytest.skip('Fashion-MNIST is not installed')
    few = ['--train_samples', '40', '--eval_samples', '20', '--num_workers', '0']
    run = str(tmp_path / 'fm')
    _, first, _ = pretrain_then_next(capsys, mae, SMALL + ARGS[mae] + ['--data', 'fashion-mnist', '--out_dir', run],
                                     few + ['--out_dir', str(tmp_path / 'k1')])
    assert (first['data'], first['model'], first['img_size']) == ('fashion-mnist', 'mini', 16)
    finetune.main(['--mode', 'knn', '--checkpoint', f'{run}/checkpoint.pt', '--out_dir', str(tmp_path / 'k2')] + few)
    lines = capsys.readouterr().out.splitlines()  # no --data: the checkpoint's, said in the line under the first
    assert json.loads(lines[0])['data'] == 'fashion-mnist' and lines[1].startswith('data: fashion-mnist, the data')
    _, first, _ = pretrain_then_next(capsys, mae, ['--model', 'mini'] + SMALL[4:] + ARGS[mae] + [
        '--out_dir', str(tmp_path / 'emb')], few + ['--out_dir', str(tmp_path / 'k3')])
    assert (first['data'], first['model'], first['img_size'], first['patch_size']) == ('', 'mini', 64, 8)
