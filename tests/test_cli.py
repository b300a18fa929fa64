"""The CLI contract: every flag of every script is documented in --help (from its Config field's comment), the
defaults follow the regime of --data (embedded / small / folder), loader workers never exceed the CPUs this process
may use, and an embedded run leaves a checkpoint at the end of every epoch."""
import json
import os

import pytest

import data
import dtm
import ibot
import lut
import mae

METHODS = (mae, lut, ibot, dtm)


@pytest.mark.parametrize('module', METHODS, ids=lambda m: m.__name__)
def test_every_flag_has_a_help_text(module, capsys):
    helps = module.field_help(module.Config)
    fields = list(module.Config.__dataclass_fields__)
    missing = [f for f in fields if len(helps.get(f, '')) < 3]
    assert not missing, f'{module.__name__}: no help text for {missing}'
    with pytest.raises(SystemExit):
        module.get_config(['--help'])
    out = capsys.readouterr().out
    for f in fields:  # each flag is printed with its own text, and "picked by data" flags say what they become
        assert f'--{f}' in out
    assert 'picked by --data: embedded' in out and 'small' in out and 'folder' in out


def test_help_text_comes_from_the_field_comment_including_continuation_lines():
    helps = dtm.field_help(dtm.Config)
    assert helps['morph_sampling'].startswith('code: removed ~ U{0..n}')
    assert helps['morph_sampling'].endswith('random split (see morph_schedule)')  # the '#' line below the field
    assert mae.field_help(mae.Config)['mask_ratio'] == 'fraction of patches removed per image'


def test_regime_of_each_dataset_kind(tmp_path):
    assert [data.regime(s) for s in ('', 'shapes', 'fashion-mnist', 'mnist', f'idx:{tmp_path}', str(tmp_path))] == \
        ['embedded', 'embedded', 'small', 'small', 'small', 'folder']
    emb, small, folder = (mae.get_config(a) for a in ([], ['--data', 'fashion-mnist'], ['--data', str(tmp_path)]))
    assert (emb.model, emb.img_size, emb.patch_size, emb.batch_size) == ('tiny', 64, 8, 64)
    assert (small.model, small.img_size, small.patch_size, small.batch_size, small.epochs) == ('mini', 32, 4, 128, 1)
    assert (folder.model, folder.img_size, folder.patch_size, folder.epochs) == ('base', 224, 16, 800)
    # an explicit flag always wins over the regime
    assert mae.get_config(['--data', 'fashion-mnist', '--model', 'tiny', '--img_size', '64']).model == 'tiny'
    # the small regime of every method runs the README's Results sizes
    for m in METHODS:
        cfg = m.get_config(['--data', 'mnist'])
        assert (cfg.model, cfg.img_size, cfg.patch_size) == ('mini', 32, 4), m.__name__


def test_workers_never_exceed_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1}, raising=False)
    assert data.default_workers(10) == 2 and data.default_workers(1) == 1 and data.default_workers(0) == 0
    assert mae.get_config(['--data', 'fashion-mnist']).num_workers == 2  # regime says 2
    assert mae.get_config(['--num_workers', '8']).num_workers == 2  # an explicit request is capped too


def test_embedded_run_saves_a_checkpoint_at_each_epoch_end(tmp_path, monkeypatch):
    """save_every 0 = once per epoch: 40 images at batch 8 is 5 steps per epoch, so a 7-step run saves at step 5
    (an interrupted run after its first epoch leaves a checkpoint and recon.png) and at the end."""
    build = data.build_dataset
    monkeypatch.setattr(data, 'build_dataset', lambda spec, split='train', img_size=64, **kw: data.Shapes(
        split, img_size, length=40) if spec in ('', 'shapes') else build(spec, split, img_size, **kw))
    saved = []
    real_save = mae.save_checkpoint
    monkeypatch.setattr(mae, 'save_checkpoint',
                        lambda path, state: (saved.append(state['step']), real_save(path, state)))
    out = str(tmp_path / 'run')
    mae.main(['--img_size', '32', '--patch_size', '8', '--decoder_dim', '32', '--decoder_depth', '1', '--decoder_heads',
              '2', '--batch_size', '8', '--max_steps', '7', '--num_workers', '0', '--log_every', '100',
              '--out_dir', out])
    assert saved == [5, 7]
    assert os.path.getsize(os.path.join(out, 'recon.png')) > 0
    steps = [json.loads(line)['step'] for line in open(os.path.join(out, 'log.jsonl'))]
    assert steps == [5, 7]  # a save step is also a log step: its loss was checked before it was written
