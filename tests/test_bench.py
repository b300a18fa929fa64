"""bench.py: the structural FLOP counts against hand arithmetic (spec notes B.2) and torch's FLOP counter on each
method's real train_step, the peak MFU divides by, tiny CPU timing runs, and the structure of the --suite dry run."""
import json
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench


def test_vit_base_forward_flops_match_worked_example():
    # ViT-B/16 full 197-token forward: 35.13 GFLOP (timm: 17.58 GMACs)
    f = bench.vit_forward_flops(768, 12, 196, 768)
    assert abs(f / 1e9 - 35.13) < 0.01


def test_mae_base_step_flops_match_worked_example():
    # MAE ViT-B/16, 224 px, mask 0.75, decoder 512 x 8: forward 19.56 GFLOP, train step 58.7 GFLOP per image
    f = bench.mae_forward_flops(768, 12, 196, 768, 49, 512, 8)
    assert abs(f / 1e9 - 19.56) < 0.01 and abs(3 * f / 1e9 - 58.7) < 0.05


def test_cpu_run_reports_what_it_measured():
    r = bench.main(['--img_size', '32', '--batch_size', '4', '--steps', '1', '--warmup', '1', '--device', 'cpu'])[0]
    assert r['img_per_s'] > 0 and r['mfu'] is None and r['device'].startswith('CPU') and r['torch']
    assert r['gflop_per_img'] > 0 and r['batch'] == 4 and r['finite'] and r['recompiles_timed'] == 0


def test_loader_mode_times_both_data_paths():
    rs = bench.main(['--loader', 'true', '--images', '8', '--batch_size', '4', '--steps', '2', '--img_size', '32',
                     '--num_workers', '0', '--device', 'cpu'])
    assert [r['path'] for r in rs] == ['cpu-pil', 'gpu'] and all(r['img_per_s'] > 0 for r in rs)
    assert all(r['device'] == 'cpu' and r['batch'] == 4 and r['torchvision'] for r in rs)


def test_lut_step_flops_by_hand():
    # D 8, depth 1, L 4, P 12, K 1, decoder 4 x 1, head 16; block(T, d) = 24 d^2 T + 4 T^2 d
    mae_fwd = 2 * 4 * 12 * 8 + (24 * 64 * 2 + 4 * 4 * 8) + 2 * 2 * 8 * 4 + (24 * 16 * 5 + 4 * 25 * 4) + 2 * 5 * 4 * 12
    assert mae_fwd == 6896 == bench.mae_forward_flops(8, 1, 4, 12, 1, 4, 1)
    view2 = 768 + 3200  # patch embed on all 4 patches, the block on 1+K = 2 tokens
    mlp = 2 * 8 * 16 * 2  # Linear 8 -> 16 -> 8 on one pooled token; head + predictor on each of 2 views online
    momentum = 768 + (24 * 64 * 5 + 4 * 25 * 8) + mlp  # full view, 1+L = 5 tokens, head only
    assert bench.lut_step_flops(8, 1, 4, 12, 1, 4, 1, 16) == 3 * (mae_fwd + view2 + 4 * mlp) + 2 * momentum == 58256


def test_lut_step_is_mae_step_plus_second_view_momentum_and_heads():
    # ViT-B/16 at 224 px: MAE step 58.7 GFLOP + second masked view (x3) + momentum on 2 full views + heads = 155.6
    D, depth, L, P, K, Dh = 768, 12, 196, 768, 49, 4096
    mae_step = 3 * bench.mae_forward_flops(D, depth, L, P, K, 512, 8)
    extra = (3 * (bench.mae_forward_flops(D, depth, L, P, K, 0, 0) + 4 * 4 * D * Dh)
             + 2 * (bench.vit_forward_flops(D, depth, L, P) + 4 * D * Dh))
    f = bench.lut_step_flops(D, depth, L, P, K, 512, 8, Dh)
    assert f == mae_step + extra and abs(f / 1e9 - 155.57) < 0.01


def test_ibot_step_flops_by_hand():
    # D 8, depth 1, L 4 (global), l 1 (local), 2 local crops, P 12, head hidden 16, bottleneck 256, K 32
    head = 2 * (8 * 16 + 16 * 16 + 16 * 256 + 256 * 32)  # one token: 25344
    g = 768 + (24 * 64 * 5 + 4 * 25 * 8) + 5 * head  # ViT + head on all 1+L tokens
    loc = 2 * 1 * 12 * 8 + (24 * 64 * 2 + 4 * 4 * 8) + head  # ViT on 1+l tokens, head on [CLS] only
    assert bench.ibot_head_flops(1, 8, 16, 32) == head == 25344
    assert bench.ibot_step_flops(8, 1, 4, 12, 1, 2, 16, 32) == 3 * (2 * g + 2 * loc) + 2 * g == 1260160


def test_ibot_local_crops_are_student_only():
    # ViT-B/16, 2 x 224 + 10 x 96 px: each local crop costs 3 x (ViT on 37 tokens + head on [CLS]); no crop = 8 globals
    D, depth, P, H, K = 768, 12, 768, 2048, 8192
    g = bench.vit_forward_flops(D, depth, 196, P) + bench.ibot_head_flops(197, D, H, K)
    loc = bench.vit_forward_flops(D, depth, 36, P) + bench.ibot_head_flops(1, D, H, K)
    assert bench.ibot_step_flops(D, depth, 196, P, 36, 0, H, K) == 8 * g
    assert bench.ibot_step_flops(D, depth, 196, P, 36, 10, H, K) == 8 * g + 30 * loc
    assert abs(bench.ibot_step_flops(D, depth, 196, P, 36, 10, H, K) / 1e9 - 499.3) < 0.05


def test_dtm_step_flops_by_hand():
    # D 8, depth 1, L 4, P 12: ViT on 5 tokens 9248, head 8 -> 8 on 4 patch tokens 512; student x3 + EMA teacher x1
    vit_fwd = 768 + (24 * 64 * 5 + 4 * 25 * 8)
    assert bench.dtm_step_flops(8, 1, 4, 12) == 3 * (vit_fwd + 2 * 4 * 8 * 8) + vit_fwd == 38528
    # ViT-B/16: 4 full 197-token forwards (35.13 each) + the head x3
    assert abs(bench.dtm_step_flops(768, 12, 196, 768) / 1e9 - (4 * 35.13 + 3 * 2 * 196 * 768 ** 2 / 1e9)) < 0.05


TINY = ['--img_size', '32', '--patch_size', '8', '--batch_size', '2', '--device', 'cpu']


def explicit_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """softmax(q k^T / sqrt(d)) v as two matmuls: the FLOP counter counts these on every torch, whereas whether it
    registers the fused SDPA kernels depends on the torch version and the device."""
    assert attn_mask is None and dropout_p == 0.0 and not is_causal and not kw
    a = (q @ k.transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5)
    return a.softmax(dim=-1) @ v


@pytest.mark.parametrize('method', ['mae', 'lut', 'ibot', 'dtm', 'finetune'])
def test_structural_count_matches_torch_flop_counter(method, monkeypatch):
    # one real step (the method's train_step, optimizer and EMA included) counted by torch (matmuls, convs,
    # attention as explicit matmuls; backward included): within 1 % of the formula
    cfg = bench.get_config(['--method', method] + TINY)
    torch.manual_seed(0)
    s = bench.STEPS[method](cfg, 'cpu')
    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention', explicit_attention)
    counter = FlopCounterMode(display=False)
    with counter:
        stats = s.run(bench.START)
    assert s.batch == 2 and torch.isfinite(stats).all()
    assert abs(counter.get_total_flops() / s.batch / s.flops - 1) < 0.01


@pytest.mark.parametrize('method', ['lut', 'ibot', 'dtm'])
def test_cpu_run_of_each_method(method):
    r = bench.main(['--method', method, '--steps', '1', '--warmup', '1'] + TINY)[0]
    assert r['method'] == method and r['img_per_s'] > 0 and r['mfu'] is None and r['device'].startswith('CPU')
    assert r['gflop_per_img'] > 0 and r['params_M'] > 0


@pytest.mark.parametrize('name, dtype, peak', [
    ('NVIDIA H100 80GB HBM3', 'bf16', 989.4), ('NVIDIA H100 80GB HBM3', 'fp32', 494.7),  # SXM: 1,979 / 989 sparse
    ('NVIDIA H100 PCIe', 'bf16', 756.5), ('NVIDIA H100 PCIe', 'fp32', 378.0),  # 1,513 / 756 sparse
    ('NVIDIA H100 NVL', 'fp16', 835.5), ('NVIDIA H200 NVL', 'fp32', 417.5),  # 1,671 / 835 sparse
    ('NVIDIA H200', 'bf16', 989.4), ('NVIDIA A100-SXM4-80GB', 'bf16', 312.0)])
def test_peak_tells_the_h100_and_h200_parts_apart(name, dtype, peak, monkeypatch):
    # MFU divides by the dense peak of the part (half the spec sheet's sparse figure); fp32 runs in TF32
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: name)
    v, label = bench.peak('cuda:0', dtype)
    assert v == peak and f'{peak:g}' in label and ('tf32' in label) == (dtype == 'fp32')
    assert bench.peak('cpu', dtype) == (None, None) and bench.peak('cuda:0', dtype, 100.0)[0] == 100.0


def test_cuda_device_runs_fp32_matmuls_in_tf32(monkeypatch):
    # the fp32 rows (and --compare's baseline) must run the TF32 math MFU's fp32 peak assumes
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    monkeypatch.setattr(torch.cuda, 'set_device', lambda device: None)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)  # a (pretended) GPU machine
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert bench.setup_device('cpu') == 'cpu' and not torch.backends.cuda.matmul.allow_tf32
        assert bench.setup_device('cuda') == 'cuda:0'
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize('L', [16, 64, 196])
def test_dtm_warmup_morphs_are_valid_and_make_the_cluster_count_dynamic(L):
    cases = bench.dtm_warmup_morphs(L, 2)
    left = []
    for (levels,) in cases:  # accum_iter 1
        counts = []
        for rs in levels:
            t = L
            for r in rs:  # one bipartite round merges at most half of the tokens left
                assert 0 <= r <= t // 2
                t -= r
            counts.append(t)
        left.append(counts)
    assert left[0] == [L, L]  # first graph: no merge
    assert all(1 < M < L for M in left[1]) and left[1][0] != left[1][1]  # M changes, per level, never 1


def test_dtm_compiled_step_recompiles_nothing_while_timed():
    # the pre-set morphings build the static and the dynamic graph first; 6 steps of drawn morphings add none
    r = bench.main(['--method', 'dtm', '--model', 'mini', '--img_size', '64', '--batch_size', '2', '--steps', '6',
                    '--warmup', '0', '--device', 'cpu', '--compile', 'true', '--compile_backend', 'aot_eager'])[0]
    assert r['recompiles_timed'] == 0 and r['finite'] and r['compile']


def suite(tmp_path, *args):
    bench.main(['--suite', 'true', '--device', 'cpu', '--out_dir', str(tmp_path)] + list(args))
    report = json.load(open(os.path.join(tmp_path, 'suite.json')))
    md = open(os.path.join(tmp_path, 'suite.md')).read()
    return report, md


def test_suite_dry_run_structure(tmp_path):
    # the CPU dry run of the GPU check (its slow parts, the CUDA tests and the compiled steps, left out here): each
    # part reported ok, one table row per figure with the hardware beside it, the mae.py run's log read back
    report, md = suite(tmp_path, '--parts', 'environment,steps,loader,mae_run')
    assert [p['part'] for p in report['parts']] == ['environment'] + [f'{m} step' for m in bench.METHODS] + [
        'data path', 'mae.py run']
    assert all(p['status'] == 'ok' for p in report['parts']), report['parts']
    rows = report['rows']
    steps = [r for r in rows if 'finite' in r]
    assert [r['method'] for r in steps] == list(bench.METHODS)
    assert all(r['finite'] and r['img_per_s'] > 0 and r['model'] == 'mini/8@32' and r['batch'] == 4 for r in steps)
    assert sorted(r['what'].split()[2] for r in rows if r['what'].startswith('data path')) == ['cpu-pil', 'gpu']
    run = [r for r in rows if 'loss_first' in r]
    assert len(run) == 1 and run[0]['steps'] == 3 and run[0]['encoder_on_cpu']
    assert report['environment']['torch'] == torch.__version__
    table = [line for line in md.splitlines() if line.startswith('| ') and 'CPU' in line.split('|')[-2]]
    assert len(table) == len(rows) == 8


def test_suite_budget_and_failure_are_reported_not_raised(tmp_path, monkeypatch):
    def broken(device):
        raise RuntimeError('no device')
    monkeypatch.setattr(bench, 'environment', broken)
    report, md = suite(tmp_path, '--parts', 'environment,steps', '--budget_s', '2')
    parts = {p['part']: p['status'] for p in report['parts']}
    assert parts['environment'] == 'failed: RuntimeError: no device'
    assert all(parts[f'{m} step'].startswith('skipped') for m in bench.METHODS)  # est 3 s > the 2 s budget
    assert report['rows'] == [] and 'failed: RuntimeError: no device' in md
