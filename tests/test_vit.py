"""vit.py: shapes of every forward path, patchify layout, position embeddings, the kept-token and mask-token
paths against the plain path, attention maps, the common ViT key layout and the checkpoint loader."""
import math

import pytest
import torch

import vit


def tiny(**kw):
    kw.setdefault('img_size', 32)
    kw.setdefault('patch_size', 8)
    kw.setdefault('num_classes', 0)
    return vit.vit('tiny', **kw).eval()


def test_patchify_round_trip_and_pixel_order():
    x = torch.randn(2, 3, 12, 8)
    p = vit.patchify(x, 4)
    assert p.shape == (2, 6, 48)
    assert torch.equal(vit.unpatchify(p, 4, 3, 2), x)
    # patch (row 1, col 1) of the 3x2 grid is index 3; inside it element (pi, qi, c) = x[c, 4+pi, 4+qi]
    pi, qi, c = 2, 3, 1
    assert p[0, 3, (pi * 4 + qi) * 3 + c] == x[0, c, 4 + pi, 4 + qi]


def test_sincos_hand_computed():
    # dim 4 on a 2x2 grid: omega = [1]; channels [sin(col), cos(col), sin(row), cos(row)]
    s1, c1 = math.sin(1), math.cos(1)
    expected = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 1], [s1, c1, 0, 1], [0, 1, s1, c1], [s1, c1, s1, c1]])
    assert torch.allclose(vit.sincos_pos_embed(4, 2), expected, atol=1e-6)
    # dim 8: per axis omega = [1, 1/100]; position (row 0, col 3)
    e = vit.sincos_pos_embed(8, 4, cls_token=False)[3]
    want = [math.sin(3), math.sin(0.03), math.cos(3), math.cos(0.03), 0, 0, 1, 1]
    assert torch.allclose(e, torch.tensor(want, dtype=torch.float32), atol=1e-6)


def test_interpolate_pos_embed():
    pe = torch.randn(1, 1 + 16, 8)
    assert vit.interpolate_pos_embed(pe, (4, 4)) is pe  # identity when sizes match
    const = torch.ones(1, 1 + 16, 8) * 0.5
    out = vit.interpolate_pos_embed(const, (6, 3))
    assert out.shape == (1, 1 + 18, 8) and torch.allclose(out, torch.full_like(out, 0.5), atol=1e-5)
    assert torch.equal(out[:, 0], const[:, 0])


def test_forward_shapes_every_path():
    m = tiny(mask_token=True, pos_embed='learned')
    x = torch.randn(2, 3, 32, 32)
    assert m.forward_features(x).shape == (2, 17, 192)
    assert m.forward_features(torch.randn(2, 3, 16, 24)).shape == (2, 1 + 6, 192)  # other grid: interpolated
    ids = torch.tensor([[0, 5, 7], [1, 2, 15]])
    assert m.forward_kept(x, ids).shape == (2, 4, 192)
    feats = m.forward_intermediates(x, [4, 12])
    assert len(feats) == 2 and feats[0].shape == (2, 17, 192)
    maps = m.forward_attention(x)
    assert len(maps) == 12 and maps[0].shape == (2, 3, 17, 17)
    assert torch.allclose(maps[0].sum(-1), torch.ones(2, 3, 17), atol=1e-5)
    c = vit.vit('tiny', img_size=32, patch_size=8, num_classes=5, global_pool='avg').eval()
    assert c(x).shape == (2, 5)
    with pytest.raises(ValueError, match='not divisible'):
        m.forward_features(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match='not divisible'):
        vit.vit('tiny', img_size=30, patch_size=8)


def test_kept_path_equals_full_path_with_restricted_attention():
    torch.manual_seed(0)
    m = tiny()
    x = torch.randn(2, 3, 32, 32)
    ids = torch.stack([torch.randperm(16)[:5] for _ in range(2)])  # (B, K)
    kept = m.forward_kept(x, ids)  # (B, 1+K, D)
    for b in range(2):
        # full sequence, but every token may attend only to [CLS] and the kept patches
        allowed = torch.zeros(17, dtype=torch.bool)
        allowed[0] = True
        allowed[1 + ids[b]] = True
        t = m.with_cls(m.embed(x[b:b + 1]))
        for blk in m.blocks:
            t = blk(t, attn_mask=allowed[None, :].expand(17, 17))
        t = m.norm(t)
        assert torch.allclose(t[0, 0], kept[b, 0], atol=1e-5)
        assert torch.allclose(t[0, 1 + ids[b]], kept[b, 1:], atol=1e-5)


def test_mask_token_path_at_ratio_zero_is_plain_path_and_masks_change_output():
    torch.manual_seed(0)
    m = tiny(mask_token=True, pos_embed='learned', weight_init='trunc_normal')
    torch.nn.init.normal_(m.mask_token)
    x = torch.randn(2, 3, 32, 32)
    none = torch.zeros(2, 16, dtype=torch.bool)
    assert torch.equal(m.forward_features(x, none), m.forward_features(x))
    mask = none.clone()
    mask[0, 3] = True
    t = m.embed(x, mask)
    pos = m.pos_embed[:, 1:]
    assert torch.allclose(t[0, 3], m.mask_token[0] + pos[0, 3])  # mask token replaces the patch, keeps its position
    assert torch.allclose(t[1], m.embed(x)[1])


def test_attention_path_matches_sdpa_path():
    torch.manual_seed(0)
    blk = vit.Block(32, 4).eval()
    x = torch.randn(2, 5, 32)
    y_attn, attn = blk(x, return_attn=True)
    assert torch.allclose(y_attn, blk(x), atol=1e-5)
    assert attn.shape == (2, 4, 5, 5)


def test_drop_path_and_layer_scale():
    x = torch.ones(4000, 3)
    assert torch.equal(vit.drop_path(x, 0.3, training=False), x)
    y = vit.drop_path(x, 0.3, training=True)
    kept = (y[:, 0] > 0).float().mean()
    assert abs(kept - 0.7) < 0.05 and torch.allclose(y[y > 0], torch.full_like(y[y > 0], 1 / 0.7))
    m = vit.vit('tiny', img_size=32, patch_size=8, num_classes=0, layer_scale=0.1)
    assert torch.allclose(m.blocks[0].ls1.gamma, torch.full((192,), 0.1))


def timm_keys(depth, classes=True):
    keys = ['cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias']
    for i in range(depth):
        for n in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2'):
            keys += [f'blocks.{i}.{n}.weight', f'blocks.{i}.{n}.bias']
    if classes:
        keys += ['head.weight', 'head.bias']
    return sorted(keys)


def test_state_dict_has_timm_layout():
    m = vit.vit('tiny', img_size=32, patch_size=8)  # 1000-class head, as timm's default
    assert sorted(m.state_dict()) == timm_keys(12)
    mt = vit.vit('tiny', img_size=32, patch_size=8, mask_token=True, num_classes=0)
    assert sorted(vit.backbone_state_dict(mt)) == timm_keys(12, classes=False)  # no mask token in `encoder`


def test_vit_base_param_count_matches_timm():
    assert vit.count_params(vit.vit_base()) == 86_567_656  # timm vit_base_patch16_224


def test_load_backbone_formats_and_errors(tmp_path):
    torch.manual_seed(0)
    src = tiny()
    sd = vit.backbone_state_dict(src)
    x = torch.randn(1, 3, 32, 32)
    ref = src.forward_features(x)
    # nanoMIM, MAE-official ('model', with decoder keys), iBOT teacher ('backbone.' prefix + head), bare
    formats = {
        'nanomim': {'encoder': sd},
        'mae': {'model': {**sd, 'decoder_embed.weight': torch.zeros(1), 'mask_token': torch.zeros(1, 1, 192)}},
        'ibot': {'teacher': {**{'backbone.' + k: v for k, v in sd.items()}, 'head.mlp.0.weight': torch.zeros(1)}},
        'bare': sd,
    }
    for name, ck in formats.items():
        path = tmp_path / f'{name}.pt'
        torch.save(ck, path)
        dst = tiny()
        missing, unexpected = vit.load_backbone(str(path), dst, verbose=False)
        assert missing == [] and unexpected == [], name
        assert torch.allclose(dst.forward_features(x), ref, atol=1e-6), name
    # another resolution: the position embedding is interpolated
    big = vit.vit('tiny', img_size=48, patch_size=8, num_classes=0)
    vit.load_backbone({'encoder': sd}, big, verbose=False)
    assert big.pos_embed.shape == (1, 37, 192)
    with pytest.raises(ValueError, match='width 192.*width 384'):
        vit.load_backbone({'encoder': sd}, vit.vit('small', img_size=32, patch_size=8, num_classes=0), verbose=False)
    with pytest.raises(FileNotFoundError):
        vit.load_backbone(str(tmp_path / 'nope.pt'), tiny())


def test_mini_size_parameter_count_by_hand():
    # ViT-mini/4 at 32 px, no head: patch embed 48*128 + 128, cls 128, pos 65*128, 6 blocks of
    # (qkv 3D^2+3D, proj D^2+D, fc1 4D^2+4D, fc2 4D^2+D, two norms 4D) = 12D^2 + 13D, final norm 2D
    D = 128
    expect = 48 * D + D + D + 65 * D + 6 * (12 * D * D + 13 * D) + 2 * D
    assert vit.count_params(vit.vit('mini', img_size=32, patch_size=4, num_classes=0)) == expect == 1_204_608


def test_load_vit_builds_what_the_checkpoint_holds(tmp_path):
    # width, depth, heads (by size name), patch, MLP ratio, layer scale and resolution are read off the file
    torch.manual_seed(0)
    src = vit.vit('mini', img_size=32, patch_size=4, num_classes=0, layer_scale=0.1).eval()
    with torch.no_grad():
        for blk in src.blocks:
            blk.ls1.gamma.uniform_(0.5, 1.5)
            blk.ls2.gamma.uniform_(0.5, 1.5)
    path = str(tmp_path / 'ls.pt')
    torch.save({'method': 'dtm', 'encoder': vit.backbone_state_dict(src), 'config': {'img_size': 32}}, path)
    m, arch = vit.load_vit(path, num_classes=0, verbose=False)
    assert (arch['model'], arch['num_heads'], arch['patch_size'], arch['img_size'], arch['layer_scale']) == \
        ('mini', 4, 4, 32, True) and arch['mlp_ratio'] == 4.0 and arch['missing'] == arch['unexpected'] == []
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m.eval().forward_features(x), src.forward_features(x))
    m48, _ = vit.load_vit(path, img_size=48, num_classes=0, verbose=False)  # another resolution: interpolated
    assert m48.pos_embed.shape == (1, 1 + 144, 128)
    with pytest.raises(ValueError, match='width 128, depth 6, patch 4 \\(ViT-mini\\).*drop model=.tiny. to build'):
        vit.load_vit(path, model='tiny', verbose=False)
    with pytest.raises(ValueError, match='patch 8'):
        vit.load_vit(path, patch_size=8, verbose=False)
    # a width outside SIZES: heads = width / 64 when that divides, else they must be given
    odd = vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=0)
    assert vit.checkpoint_arch({'encoder': vit.backbone_state_dict(odd)})['num_heads'] == 2
    odd = vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=0)
    with pytest.raises(ValueError, match='head count'):
        vit.checkpoint_arch(vit.backbone_state_dict(odd))
    assert vit.checkpoint_arch(vit.backbone_state_dict(odd), num_heads=3)['img_size'] == 16  # from pos_embed
    # no absolute position embedding in the file (BEiT relative position only): none in the model either
    sd = {k: v for k, v in vit.backbone_state_dict(src).items() if k != 'pos_embed'}
    m, arch = vit.load_vit(sd, img_size=32, verbose=False)
    assert not arch['abs_pos_embed'] and torch.equal(m.pos_embed, torch.zeros_like(m.pos_embed))
    with pytest.raises(ValueError, match='cannot read checkpoint'):
        (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
        vit.load_vit(str(tmp_path / 'junk.pt'))
    with pytest.raises(ValueError, match='no ViT backbone'):
        vit.load_vit({'model': {'fc.weight': torch.zeros(2, 2)}})
