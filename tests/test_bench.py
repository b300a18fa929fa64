"""bench.py: the structural FLOP count against hand arithmetic (spec notes B.2) and a tiny CPU timing run."""
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
    assert r['gflop_per_img'] > 0
