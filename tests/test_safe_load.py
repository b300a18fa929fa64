"""A checkpoint is data: every loader reads weights only (tensors, containers, numbers, strings, and
argparse.Namespace for the official releases' 'args'). A file whose unpickling would call anything else is refused
with one line naming the file and what it asked for, before that call runs; --trust_checkpoint loads it anyway."""
import argparse
import os
import re

import pytest
import torch

import analyze
import dtm
import eval_seg
import finetune
import mae
import vit


def tiny():
    return vit.vit('tiny', img_size=32, patch_size=8, num_classes=0).eval()


class MakesAFile:
    """Unpickles to open(path, 'w'): loading the checkpoint creates `path` (the harmless stand-in for os.system)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, 'w')


def evil_checkpoint(tmp_path, sd=None):
    marker = str(tmp_path / 'created_by_unpickling')
    path = str(tmp_path / 'evil.pth')
    torch.save({'encoder': sd if sd is not None else vit.backbone_state_dict(tiny()), 'x': MakesAFile(marker)}, path)
    return path, marker


def test_official_release_formats_load_as_weights_only(tmp_path):
    # the layouts the official code saves (MAE / LUT / BEiT / DTM misc.save_model, iBOT / DINO save_on_master), with
    # their argparse.Namespace 'args', optimizer and scaler states: all load and give the same backbone
    torch.manual_seed(0)
    src = tiny()
    args = argparse.Namespace(model='vit_tiny', lr=1.5e-4, output_dir='./out', input_size=32, pred_ratio=[0, 0.3])
    opt = torch.optim.AdamW(src.parameters())
    src(torch.randn(1, 3, 32, 32)).sum().backward()
    opt.step()  # an optimizer state as the full checkpoints hold it
    sd = vit.backbone_state_dict(src)
    scaler = {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000,
              '_growth_tracker': 0}
    teacher = {**{'backbone.' + k: v for k, v in sd.items()}, 'head.last_layer.weight_g': torch.ones(8, 1)}
    formats = {
        'mae_release': {'model': sd},
        'mae_full': {'model': sd, 'optimizer': opt.state_dict(), 'epoch': 799, 'scaler': scaler, 'args': args},
        'lut': {'model': sd, 'model_ema': sd, 'optimizer': opt.state_dict(), 'epoch': 1599, 'args': args},
        'ibot': {'student': {'module.' + k: v for k, v in teacher.items()}, 'teacher': teacher,
                 'optimizer': opt.state_dict(), 'epoch': 400, 'args': args,
                 'ibot_loss': {'center': torch.zeros(1, 8), 'center2': torch.zeros(1, 1, 8)}, 'fp16_scaler': scaler},
        'dino': {'student': teacher, 'teacher': teacher, 'epoch': 100, 'args': args, 'dino_loss': {}},
    }
    x = torch.randn(2, 3, 32, 32)
    for name, ck in formats.items():
        path = str(tmp_path / f'{name}.pth')
        torch.save(ck, path)
        net, _ = vit.load_vit(path, num_classes=0, verbose=False)
        assert torch.allclose(net.eval().forward_features(x), src.forward_features(x), atol=1e-6), name
        assert vit.read_checkpoint(path, verbose=False).get('args', args) == args, name


def test_a_checkpoint_that_would_create_a_file_is_refused_in_one_line(tmp_path):
    path, marker = evil_checkpoint(tmp_path)
    for load in (lambda: vit.read_checkpoint(path, verbose=False), lambda: vit.load_vit(path, verbose=False),
                 lambda: vit.safe_load(path)):
        with pytest.raises(ValueError) as e:
            load()
        msg = str(e.value)
        assert '\n' not in msg and path in msg and re.search(r'needs \w+\.open,', msg) and '--trust_checkpoint' in msg
    assert not os.path.exists(marker)
    # other globals than the allow-list are refused the same way (numpy, which the releases do not need)
    import numpy as np
    torch.save({'model': {}, 'arr': np.zeros(3)}, str(tmp_path / 'numpy.pth'))
    with pytest.raises(ValueError, match=r'numpy\S* .*--trust_checkpoint'):
        vit.read_checkpoint(str(tmp_path / 'numpy.pth'))
    # trusted: the full unpickler runs the file's callable (which is what the refusal protects against)
    ck = vit.read_checkpoint(path, verbose=False, trust=True)
    ck['x'].close()
    assert os.path.exists(marker) and 'encoder' in ck


def refused(main, argv, marker, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value)
    assert msg.startswith('error:') and '\n' not in msg and re.search(r'needs \w+\.open,', msg), msg
    assert '--trust_checkpoint' in msg, msg
    assert not os.path.exists(marker)
    return msg


@pytest.mark.parametrize('script', ['finetune', 'eval_seg', 'analyze', 'mae_resume', 'dtm_vit', 'dtm_clip'])
def test_every_script_refuses_it_before_running_it(script, tmp_path, capsys):
    path, marker = evil_checkpoint(tmp_path)
    out = str(tmp_path / 'out')
    mains = {
        'finetune': (finetune.main, ['--mode', 'knn', '--checkpoint', path, '--out_dir', out, '--device', 'cpu']),
        'eval_seg': (eval_seg.main, ['--checkpoint', path, '--out_dir', out, '--device', 'cpu']),
        'analyze': (analyze.main, ['--checkpoint', path, '--out_dir', out, '--device', 'cpu']),
        'mae_resume': (mae.main, ['--resume', path, '--out_dir', out, '--device', 'cpu']),
        'dtm_vit': (dtm.main, ['--teacher', f'vit:{path}', '--out_dir', out, '--device', 'cpu']),
        'dtm_clip': (dtm.main, ['--teacher', f'clip:{path}', '--out_dir', out, '--device', 'cpu']),
    }
    main, argv = mains[script]
    refused(main, argv, marker, capsys)


def test_trust_flag_reaches_the_loader(tmp_path):
    # --trust_checkpoint: the file is read with the full unpickler (the file appears), then judged as before
    path, marker = evil_checkpoint(tmp_path)
    cfg = mae.get_config(['--trust_checkpoint'])
    assert cfg.trust_checkpoint and not mae.get_config([]).trust_checkpoint  # never the default
    with pytest.raises(SystemExit, match='a non-nanoMIM checkpoint, not an MAE checkpoint'):
        mae.load_checkpoint(path, cfg)
    assert os.path.exists(marker)
