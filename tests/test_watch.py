"""Watching a run: the kNN monitor equals finetune.py --mode knn, leaves training bit-identical (also across a
resume) and logs each point once; snapshots at the right epochs load with vit.load_vit and are never half-written;
a failed write ends the run with one line and the run resumes; analyze.py --what curves draws two runs.
A tiny labelled image folder (4 classes, 32 train / 12 val images, batch 8: 4 steps per epoch) keeps each run short."""
import errno
import io
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

import analyze
import data
import finetune
import ibot
import mae
import vit
from conftest import run_torchrun

MAE = ['--model', 'mini', '--img_size', '32', '--patch_size', '8', '--decoder_dim', '32', '--decoder_depth', '1',
       '--decoder_heads', '2', '--batch_size', '8', '--epochs', '2', '--lr', '1e-3', '--warmup_epochs', '0',
       '--num_workers', '0', '--log_every', '2', '--device', 'cpu']
IBOT = ['--model', 'mini', '--img_size', '32', '--local_size', '16', '--patch_size', '8', '--local_crops_number', '2',
        '--out_dim', '64', '--head_hidden', '64', '--batch_size', '8', '--epochs', '2', '--lr', '1e-3',
        '--warmup_epochs', '0', '--num_workers', '0', '--log_every', '2', '--device', 'cpu']
OFF = ['--knn_every', '0', '--keep_every', '0']
ON = ['--knn_every', '1', '--knn_train', '24', '--knn_val', '12', '--keep_every', '1']


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """DIR/{train,val}/<class>/*.png: 4 of the embedded shape classes, 8 train and 3 val images each."""
    root = tmp_path_factory.mktemp('tinyf')
    for split, n, first in (('train', 32, 0), ('val', 12, 5000)):
        for i in range(n):
            index = first + i // 4 * 10 + i % 4  # render_shape's class is index % 10: classes 0..3
            img, label, _ = data.render_shape(index, 32, 0)
            d = root / split / data.SHAPE_CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f'{i}.png')
    return str(root)


def records(out):
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def weights(out):
    ck = torch.load(os.path.join(out, 'checkpoint.pt'), map_location='cpu', weights_only=True)
    return ck['step'], {k: v for k, v in ck.items() if k in ('model', 'teacher', 'centers', 'optimizer')}


def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


@pytest.mark.parametrize('mod, args', [(mae, MAE), (ibot, IBOT)], ids=['mae', 'ibot'])
def test_monitor_on_off_bit_identical_across_resume_and_points_logged_once(tmp_path, folder, mod, args):
    off, on = str(tmp_path / 'off'), str(tmp_path / 'on')
    mod.main(args + OFF + ['--data', folder, '--out_dir', off])
    mod.main(args + ON + ['--data', folder, '--out_dir', on, '--max_steps', '6'])  # stops inside epoch 2
    mod.main(args + ON + ['--data', folder, '--out_dir', on, '--resume', 'auto'])
    (s_off, w_off), (s_on, w_on) = weights(off), weights(on)
    assert s_off == s_on == 8 and same(w_off, w_on)
    # points: step 0, end of epoch 1 (step 4), the first run's last step (6), end of epoch 2 (8); none repeated
    knn = [r for r in records(on) if 'knn_top1' in r]
    assert [r['step'] for r in knn] == [0, 4, 6, 8]
    assert all(0 <= r['knn_top1'] <= 100 and r['knn_seconds'] > 0 for r in knn)
    assert all(r['knn_top1'] == round(r['knn_top1'] * 12 / 100) * 100 / 12 for r in knn)  # hits out of 12 images
    assert not any('knn_top1' in r for r in records(off))
    # snapshots after epochs 1 and 2, encoder + config + step + method only, loadable, no temp file left
    assert sorted(os.listdir(on)) == ['checkpoint-0001.pt', 'checkpoint-0002.pt', 'checkpoint.pt', 'log.jsonl'] + \
        (['recon.png'] if mod is mae else [])
    final = torch.load(os.path.join(on, 'checkpoint.pt'), map_location='cpu', weights_only=True)
    for epoch in (1, 2):
        snap = torch.load(os.path.join(on, f'checkpoint-{epoch:04d}.pt'), map_location='cpu', weights_only=True)
        assert set(snap) == {'method', 'encoder', 'config', 'step'} and snap['step'] == 4 * epoch
        net, arch = vit.load_vit(os.path.join(on, f'checkpoint-{epoch:04d}.pt'), verbose=False)
        assert arch['model'] == 'mini' and arch['patch_size'] == 8 and not arch['missing']
    assert same(snap['encoder'], final['encoder'])  # epoch 2 = the last step: the checkpoint's encoder


def test_monitor_equals_finetune_knn_on_the_same_checkpoint_and_subset(tmp_path, folder):
    out = str(tmp_path / 'ibot')
    ibot.main(IBOT + ['--data', folder, '--out_dir', out, '--max_steps', '3', '--knn_every', '1',
                      '--knn_train', '20', '--knn_val', '10'])
    monitor = [r for r in records(out) if 'knn_top1' in r][-1]
    assert monitor['step'] == 3
    ft = str(tmp_path / 'ft')
    finetune.main(['--mode', 'knn', '--checkpoint', os.path.join(out, 'checkpoint.pt'), '--data', folder,
                   '--model', 'mini', '--img_size', '32', '--patch_size', '8', '--train_samples', '20',
                   '--eval_samples', '10', '--num_workers', '0', '--device', 'cpu', '--out_dir', ft])
    with open(os.path.join(ft, 'results.json')) as f:
        assert json.load(f)['acc1'] == monitor['knn_top1']


def test_distributed_monitor_equals_single_process(tmp_path, folder):
    """Two ranks embed 13 / 12 train and 6 / 5 val images each (odd shares); the figure is the one-process one."""
    args = MAE + ['--data', folder, '--epochs', '1', '--knn_every', '1', '--knn_train', '25', '--knn_val', '11']
    run_torchrun('mae.py', args + ['--batch_size', '4', '--out_dir', str(tmp_path / 'ddp')])
    mae.main(args + ['--batch_size', '8', '--out_dir', str(tmp_path / 'one')])
    ddp, one = ([(r['step'], r['knn_top1']) for r in records(tmp_path / d) if 'knn_top1' in r] for d in ('ddp', 'one'))
    assert ddp == one and [s for s, _ in one] == [0, 4]


def test_knn_top1_draws_no_random_number_and_restores_modes(folder):
    enc = vit.vit('mini', img_size=32, patch_size=8, num_classes=0, drop_path_rate=0.1)
    enc.blocks[0].train()
    enc.blocks[1].eval()
    modes = [m.training for m in enc.modules()]
    sets = data.knn_sets(folder, 32, 16, 8)
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    top1 = data.knn_top1(enc, sets, 8, 1, 0, 'cpu', torch.autocast('cpu', enabled=False))
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert (np.random.get_state()[1] == states[2]).all()
    assert [m.training for m in enc.modules()] == modes and 0 <= top1 <= 100
    # the same figure as the vote of the same features, scored by hand: cosine top-k, weights exp(sim / T)
    enc.eval()
    feats = [torch.stack([enc.forward_features(x[None])[0, 0] for x, _ in ds]) for ds in sets[:2]]
    labels = [torch.tensor([y for _, y in ds]) for ds in sets[:2]]
    tr, te = (torch.nn.functional.normalize(f, dim=1) for f in feats)
    hits = 0
    for q, y in zip(te, labels[1]):
        sim = tr @ q
        top = sim.argsort(descending=True)[:20]
        votes = torch.zeros(4).index_add_(0, labels[0][top], (sim[top] / 0.07).exp())
        hits += int(votes.argmax() == y)
    assert top1 == pytest.approx(100 * hits / len(te))


def test_a_folder_without_labels_turns_the_monitor_off_with_one_line(tmp_path, folder):
    flat = tmp_path / 'flat' / 'imgs'
    flat.mkdir(parents=True)
    for i in range(16):
        Image.fromarray(data.render_shape(i, 32, 0)[0]).save(flat / f'{i}.png')
    assert 'no train/ and val/' in data.knn_sets(str(tmp_path / 'flat'), 32, 8, 8)
    assert isinstance(data.knn_sets(folder, 32, 8, 8), tuple)


@pytest.mark.parametrize('target', ['checkpoint.pt', 'checkpoint-0002.pt'])
def test_a_full_disk_ends_the_run_with_one_line_and_the_run_resumes(tmp_path, folder, capsys, monkeypatch, target):
    out = str(tmp_path / 'run')
    real_open = open

    class Full(io.RawIOBase):  # a file that takes 1000 bytes, then the disk is full
        def __init__(self, f):
            self.f, self.n = f, 0

        def writable(self):
            return True

        def write(self, b):
            if self.n + len(b) > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.n += len(b)
            return self.f.write(b)

        def close(self):
            self.f.close()
            super().close()

    def full_open(path, mode='r', *a, **kw):  # the second save of checkpoint.pt, or the epoch-2 snapshot
        f = real_open(path, mode, *a, **kw)
        name = os.path.basename(str(path)).split('.tmp.')[0]
        if '.tmp.' in str(path) and name == target and (target != 'checkpoint.pt' or os.path.exists(
                os.path.join(out, 'checkpoint.pt'))):
            return Full(f)
        return f

    monkeypatch.setattr(mae, 'open', full_open, raising=False)  # what save_checkpoint's open() finds first
    with pytest.raises(SystemExit) as e:
        mae.main(MAE + ON + ['--data', folder, '--out_dir', out])
    assert e.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f'error: cannot write {os.path.join(out, target)} (No space left')
    assert 'MB free' in err[0] and 'needs about' in err[0]
    assert err[0].endswith(f'{os.path.join(out, "checkpoint.pt")} (step 4) is intact; resume from it with --resume '
                           f'{os.path.join(out, "checkpoint.pt")}')
    assert not any('.tmp.' in f for f in os.listdir(out))  # the torn temporary file is gone
    assert ('checkpoint-0002.pt' in os.listdir(out)) == (target == 'checkpoint.pt')  # written before checkpoint.pt
    assert weights(out)[0] == 4
    monkeypatch.setattr(mae, 'open', real_open, raising=False)
    mae.main(MAE + ON + ['--data', folder, '--out_dir', out, '--resume', 'auto'])
    ref = str(tmp_path / 'ref')
    mae.main(MAE + OFF + ['--data', folder, '--out_dir', ref])
    assert same(weights(out), weights(ref)) and 'checkpoint-0002.pt' in os.listdir(out)


def test_room_warning_line(tmp_path, capsys):
    mae.check_room(str(tmp_path), 2 ** 60, 2 ** 50, 3)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'warning: {tmp_path} has ') and '3 snapshots' in err[0]
    mae.check_room(str(tmp_path), 1, 1, 0)
    assert capsys.readouterr().err == ''


def test_analyze_curves_of_two_runs_writes_figure_and_table(tmp_path, folder):
    runs = [str(tmp_path / 'a'), str(tmp_path / 'b')]
    mae.main(MAE + ON + ['--data', folder, '--out_dir', runs[0], '--max_steps', '4'])
    ibot.main(IBOT + ON + ['--data', folder, '--out_dir', runs[1], '--max_steps', '4'])
    out = str(tmp_path / 'curves')
    analyze.main(['--what', 'curves', '--log', runs[0], '--log', os.path.join(runs[1], 'log.jsonl'), '--out_dir', out])
    report = open(os.path.join(out, 'report.md')).read()
    for run, method in zip(runs, ('mae', 'ibot')):
        knn = {r['epoch']: r['knn_top1'] for r in records(run) if 'knn_top1' in r}
        assert sorted(knn) == [0.0, 1.0]
        row = f"| {method} ({os.path.basename(run)}) | {knn[0.0]:.2f} | {knn[1.0]:.2f} |"
        assert row in report, report
    assert '| run | ep 0 | ep 1 | s / pass |' in report
    if analyze.pyplot() is not None:
        assert os.path.getsize(os.path.join(out, 'curves.png')) > 10_000
