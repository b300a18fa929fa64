"""The copied skeleton is one truth: what the method files (and the evaluation scripts) share verbatim is compared
here, so a fix lands in every copy or this test fails, naming the file and the function or block that drifted.
Each file stays standalone (copy one into another codebase and it runs); the copies are deliberate and checked."""
import ast
import os

import pytest

from conftest import ROOT

METHODS = ('mae.py', 'lut.py', 'ibot.py', 'dtm.py')

# function name -> the files that carry it verbatim (the first one is the reference)
EVALS = ('finetune.py', 'eval_seg.py')
SHARED_FUNCTIONS = {
    **{name: METHODS + EVALS for name in ('setup_distributed', 'setup_precision', 'step_seed', 'save_checkpoint',
                                          'restore')},
    'resolve_device': METHODS + EVALS + ('analyze.py',),
    'field_help': METHODS + EVALS + ('analyze.py',),
    **{name: METHODS + ('finetune.py',) for name in ('lr_at', 'log_stats')},
    **{name: METHODS for name in ('get_config', 'load_checkpoint', 'state_bytes', 'check_room',
                                  'exit_on_failed_write')},
    'ema_update': ('lut.py', 'ibot.py', 'dtm.py', 'finetune.py'),
    'momentum_at': ('lut.py', 'ibot.py', 'dtm.py'),
    **{name: ('mae.py', 'lut.py') for name in ('random_masking', 'mask_from_ids', 'pixel_target', 'mae_loss',
                                             'unnormalize_prediction')},
}

# blocks of main(), by their first and last lines: set-up, resume, and the log / save cadence after each step
SHARED_BLOCKS = {
    'main: distributed + precision set-up': ('    ddp, rank, local_rank, world, device = setup_distributed(cfg)\n',
                                             '    dtype, autocast, scaler = setup_precision(cfg, device_type)\n'),
    'main: resume': ('    step = 0\n', '        del ckpt\n'),
    'main: DDP / compile wrapping': ('    # DDP first, then compile', '    fwd = torch.compile(fwd) if cfg.compile else fwd\n'),
    'main: log / save cadence': ('        step += 1\n', '            checkpoint()\n'),
    'main: watching the run (kNN monitor, snapshots, failed writes)': (
        '    # watching the run', '        knn_point()  # the random-init point of the curve\n'),
}


def functions(text):
    """{top-level function name: its source text, decorators included}."""
    lines = text.splitlines(keepends=True)
    return {n.name: ''.join(lines[n.lineno - 1 - len(n.decorator_list):n.end_lineno])
            for n in ast.parse(text).body if isinstance(n, ast.FunctionDef)}


def block(text, first, last):
    i = text.find(first)
    j = text.find(last, i)
    return None if i < 0 or j < 0 else text[i:j + len(last)]


def skeleton_drift(texts):
    """texts: {file name: source}. Returns one message per shared function or block that is missing from a file
    or differs from the reference copy (the first file listed for it)."""
    problems = []
    funcs = {f: functions(t) for f, t in texts.items()}
    for name, files in SHARED_FUNCTIONS.items():
        ref = files[0]
        for f in files:
            if name not in funcs[f]:
                problems.append(f'{f}: function {name} is missing (it is shared with {ref})')
            elif funcs[f][name] != funcs[ref][name]:
                problems.append(f'{f}: function {name} differs from its copy in {ref}')
    for label, (first, last) in SHARED_BLOCKS.items():
        ref = block(texts[METHODS[0]], first, last)
        assert ref is not None, f'{METHODS[0]}: block "{label}" not found'
        for f in METHODS[1:] + (EVALS if label.startswith('main: distributed') else ()):
            got = block(texts[f], first, last)
            if got is None:
                problems.append(f'{f}: block "{label}" is missing (it is shared with {METHODS[0]})')
            elif got != ref:
                problems.append(f'{f}: block "{label}" differs from its copy in {METHODS[0]}')
    return problems


def read_all():
    return {f: open(os.path.join(ROOT, f)).read() for f in METHODS + EVALS + ('analyze.py',)}


def test_shared_skeleton_is_identical_in_every_method_file():
    problems = skeleton_drift(read_all())
    assert not problems, 'the shared skeleton drifted; edit every copy:\n' + '\n'.join(problems)


@pytest.mark.parametrize('edit', [
    ('lut.py', "    tmp = f'{path}.tmp.{os.getpid()}'", "    tmp = path + '.tmp'", 'lut.py: function save_checkpoint'),
    ('eval_seg.py', "    if device.startswith('cuda') and (ddp or device == 'cuda'):", "    if ddp:",
     'eval_seg.py: function resolve_device'),
    ('dtm.py', '    return seed + 1_000_003 * rank + 7919 * step', '    return seed + step',
     'dtm.py: function step_seed'),
    ('ibot.py', '        save_now = step % save_every == 0 or step == end_step',
     '        save_now = step % save_every == 0', 'ibot.py: block "main: log / save cadence"'),
    ('dtm.py', '    """teacher <- m teacher', '    """EMA: teacher <- m teacher', 'dtm.py: function ema_update'),
])
def test_an_edit_to_one_copy_alone_is_reported_with_file_and_name(edit):
    f, old, new, expected = edit
    texts = read_all()
    assert old in texts[f]
    texts[f] = texts[f].replace(old, new, 1)
    problems = skeleton_drift(texts)
    assert any(p.startswith(expected) for p in problems), problems
    # an edit of the reference copy alone is reported in every other file
    texts = read_all()
    texts['mae.py'] = texts['mae.py'].replace('    """Atomic: write', '    """Atomic (fsync): write', 1)
    texts['mae.py'] = texts['mae.py'].replace("    out, name = {}, None", "    out, name = dict(), None", 1)
    assert {p.split(':')[0] for p in skeleton_drift(texts)} == {'lut.py', 'ibot.py', 'dtm.py', 'finetune.py',
                                                              'eval_seg.py', 'analyze.py'}
