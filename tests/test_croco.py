"""CroCo's decoder block as a decoder choice of CDG-MAE (CroCo Sec. 3, Fig. 4; REFERENCE 4):
each test states one property of the block or of its wiring into CDGMAE."""
import math

import pytest
import torch
import torch.nn.functional as F

import cdgmae
from cdgmae import CDGMAE, CroCoDecoderBlock, DecoderBlock

pytestmark = pytest.mark.float_kernels  # the verdicts compare float results of torch's kernels

TINY = dict(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2,
            decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, decoder_ffn_dim=64)


def random_block(dim=16, seed=0):
    """A CroCo block whose LayerNorms have random affine parameters (so a norm is visible)."""
    torch.manual_seed(seed)
    block = CroCoDecoderBlock(dim, num_heads=2)
    for norm in (block.norm1, block.norm2, block.norm3, block.norm_memory):
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.normal_(0, 0.3)
    return block.eval()


def layer_norm(x, norm):
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, eps=1e-6)


# --- The block ------------------------------------------------------------------

def test_with_every_sublayer_output_zeroed_the_block_is_the_identity():
    """Pre-norm: the residual stream is never normalised, so with self-attention, cross-attention
    and MLP all outputting zero the block returns its input unchanged (a post-norm block would
    return LN(x))."""
    block = random_block()
    for layer in (block.self_attn.proj, block.cross_attn.proj, block.mlp.fc2):
        layer.weight.data.zero_()
        layer.bias.data.zero_()
    x, memory = 3 * torch.randn(2, 7, 16) + 1, torch.randn(2, 5, 16)
    torch.testing.assert_close(block(x, memory), x, rtol=0, atol=0)
    # the paper's (CropMAE's) post-norm block under the same zeroing is not the identity
    post = DecoderBlock(16, 2, ffn_dim=32, dropout=0.0).eval()
    for layer in (post.self_attn.proj, post.cross_attn.proj, post.mlp.fc2):
        layer.weight.data.zero_()
        layer.bias.data.zero_()
    assert not torch.allclose(post(x, memory), x, atol=1e-2)  # LN(x) is x moved by about |x| ~ 3


def test_sublayers_run_self_then_cross_then_mlp_each_on_its_own_normalised_input():
    block = random_block(seed=1)
    calls = []
    for name in ("norm1", "self_attn", "norm2", "norm_memory", "cross_attn", "norm3", "mlp"):
        getattr(block, name).register_forward_hook(
            lambda m, inputs, out, name=name: calls.append((name, [t.clone() for t in inputs], out.clone())))
    x, memory = torch.randn(2, 7, 16), 2 * torch.randn(2, 5, 16) - 1
    out = block(x, memory)
    order = [name for name, _, _ in calls]
    assert [n for n in order if n in ("self_attn", "cross_attn", "mlp")] == ["self_attn", "cross_attn", "mlp"]
    assert order.index("norm1") < order.index("self_attn") < order.index("norm2") < order.index("cross_attn")
    assert order.index("norm_memory") < order.index("cross_attn") < order.index("norm3") < order.index("mlp")
    seen = {name: (inputs, output) for name, inputs, output in calls}
    # Each check redoes the block's own operations on the same tensors, so the results are equal to the bit.
    # x + SelfAttn(LN1(x))
    assert torch.equal(seen["self_attn"][0][0], layer_norm(x, block.norm1))
    x1 = x + seen["self_attn"][1]
    # x + CrossAttn(LN2(x), LN_m(memory)): the queries and the memory are both normalised
    query, keys = seen["cross_attn"][0]
    assert torch.equal(query, layer_norm(x1, block.norm2))
    assert torch.equal(keys, layer_norm(memory, block.norm_memory))
    x2 = x1 + seen["cross_attn"][1]
    # x + MLP(LN3(x))
    assert torch.equal(seen["mlp"][0][0], layer_norm(x2, block.norm3))
    assert torch.equal(out, x2 + seen["mlp"][1])


def test_block_follows_crocos_sizes_mlp_ratio_4_and_no_dropout():
    block = CroCoDecoderBlock(256, num_heads=8)
    assert (block.mlp.fc1.in_features, block.mlp.fc1.out_features) == (256, 1024)  # CroCo: mlp_ratio 4
    assert block.self_attn.attn_drop == 0 and block.cross_attn.attn_drop == 0
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in block.modules())
    assert all(m.eps == 1e-6 for m in block.modules() if isinstance(m, torch.nn.LayerNorm))
    assert block.self_attn.qkv.bias is not None and block.cross_attn.kv.bias is not None


def test_keys_and_values_are_initialised_like_two_separate_linears():
    """CroCo projects keys and values with two [D, D] Linears: xavier bound sqrt(6 / 2D) each,
    wider than the fused [2D, D] Linear's sqrt(6 / 3D)."""
    torch.manual_seed(2)
    model = cdgmae.build_model(decoder_block="croco", **{**TINY, "decoder_embed_dim": 256, "decoder_num_heads": 8})
    w = model.decoder_blocks[0].cross_attn.kv.weight
    for half in w.chunk(2):
        assert half.abs().max() <= math.sqrt(6 / 512)
        assert half.abs().max() > math.sqrt(6 / 768) * 1.1
    assert (model.decoder_blocks[0].cross_attn.kv.bias == 0).all()


# --- Wiring into CDGMAE ------------------------------------------------------------

def memory_seen_by_first_block(model, *args, **kwargs):
    seen = {}
    handle = model.decoder_blocks[0].register_forward_pre_hook(lambda m, inputs: seen.update(memory=inputs[1]))
    model(*args, **kwargs)
    handle.remove()
    return seen["memory"]


def test_memory_gets_each_anchors_kept_patch_position_embeddings_and_zero_on_cls():
    """Perturbing the decoder position embedding of one patch p moves exactly the memory rows of
    the anchors that kept p, by exactly the perturbation; with the paper's block nothing moves."""
    torch.manual_seed(3)
    B, N, L, p = 2, 2, 16, 6
    target, anchors = torch.randn(B, 3, 64, 64), torch.randn(B, N, 3, 64, 64)
    target_noise, anchor_noise = torch.rand(B, L), torch.rand(B, N, L)
    kept = int(L * (1 - 0.25))                                  # 12 of 16 patches per anchor
    for block, moves in (("croco", True), ("cdgmae", False)):
        model = cdgmae.build_model(num_anchors=N, anchor_mask_ratio=0.25, decoder_block=block, **TINY).eval()
        before = memory_seen_by_first_block(model, target, anchors, target_noise, anchor_noise)
        assert before.shape == (B, N * (1 + kept), 32)          # [B, N*(1+K_a), Dd]
        delta = torch.randn(32)
        model.decoder_pos_embed.data[0, 1 + p] += delta
        after = memory_seen_by_first_block(model, target, anchors, target_noise, anchor_noise)
        expected = torch.zeros_like(before)
        for b in range(B):
            for n in range(N):
                order = torch.argsort(anchor_noise[b, n])[:kept].tolist()  # kept patches, lowest noise first
                if moves and p in order:
                    expected[b, n * (1 + kept) + 1 + order.index(p)] = delta
        # rows are recomputed identically except for the sum token + position + delta: rounding once before
        # and once after, |error| <= 2 eps max|row| ~ 1e-6 (|row| < 8)
        torch.testing.assert_close(after - before, expected, atol=1e-5, rtol=0)
        if moves:  # in this draw some anchor keeps p, so the test can fail
            assert expected.abs().sum() > 0


def test_unmasked_anchor_memory_is_tokens_plus_the_whole_decoder_embedding():
    torch.manual_seed(4)
    model = cdgmae.build_model(num_anchors=2, anchor_mask_ratio=0.0, decoder_block="croco", **TINY).eval()
    target, anchors = torch.randn(1, 3, 64, 64), torch.randn(1, 2, 3, 64, 64)
    memory = memory_seen_by_first_block(model, target, anchors)
    with torch.no_grad():
        tokens = model.decoder_embed(model.forward_features(anchors[0]))      # [2, 17, Dd]
    pos = cdgmae.sincos_pos_embed(32, 4, 4)                                    # zero row for cls
    assert torch.equal(memory[0], (tokens + pos).reshape(2 * 17, 32))  # the model's own operations: to the bit


def test_croco_model_trains_with_two_anchors_masked_at_a_quarter():
    torch.manual_seed(5)
    model = cdgmae.build_model(num_anchors=2, anchor_mask_ratio=0.25, decoder_block="croco", **TINY)
    assert all(isinstance(b, CroCoDecoderBlock) for b in model.decoder_blocks)
    loss, pred, mask = model(torch.randn(2, 3, 64, 64), torch.randn(2, 2, 3, 64, 64))
    assert torch.isfinite(loss) and pred.shape == (2, 16, 16 * 16 * 3) and mask.shape == (2, 16)
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name
    before = loss.item()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fixed = (torch.randn(2, 3, 64, 64), torch.randn(2, 2, 3, 64, 64), torch.rand(2, 16), torch.rand(2, 2, 16))
    first = None
    for _ in range(15):
        opt.zero_grad()
        loss = model(*fixed)[0]
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert math.isfinite(before) and loss.item() < first


def test_default_block_is_the_papers_and_the_flag_selects_croco():
    assert all(isinstance(b, DecoderBlock) for b in CDGMAE(**TINY).decoder_blocks)
    parser = cdgmae.get_args_parser()
    assert cdgmae.model_config(parser.parse_args([]))["decoder_block"] == "cdgmae"
    config = cdgmae.model_config(parser.parse_args(["--decoder-block", "croco"]))
    assert config["decoder_block"] == "croco"
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--decoder-block", "crocov2"])
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="decoder_block"):
        cdgmae.build_model(decoder_block="catblock", **TINY)


# --- FLOPs -------------------------------------------------------------------------

def test_flop_count_of_the_croco_decoder_matches_a_count_by_hand():
    """ViT-S/16 + 4 CroCo blocks of width 256, N = 3, r_a = 0.25, multiply-adds counted by hand."""
    D, Dd, L = 384, 256, 196
    enc_token = 12 * (D * 3 * D + D * D + 2 * D * 4 * D)
    patch_embed = L * (3 * 16 * 16) * D
    t_tokens, a_tokens, n = 1 + 19, 1 + 147, 3
    encoder = (1 + n) * patch_embed + (t_tokens + n * a_tokens) * enc_token
    dec_target = 4 * 197 * (3 * Dd * Dd + Dd * Dd      # self-attn qkv and proj
                            + Dd * Dd + Dd * Dd        # cross-attn q and proj
                            + 2 * Dd * 4 * Dd)         # MLP, ratio 4
    dec_memory = n * a_tokens * (D * Dd + 4 * 2 * Dd * Dd)  # decoder_embed + k, v of 4 blocks
    decoder = t_tokens * D * Dd + dec_target + dec_memory + 197 * Dd * 768
    layernorm = 5 * ((t_tokens + n * a_tokens) * D * 25                 # 12 x 2 + final, encoder
                     + 197 * Dd * (4 * 3 + 1) + 4 * n * a_tokens * Dd)  # 3 per block + final; memory norm
    counts = cdgmae.count_flops(cdgmae.build_model(num_anchors=3, anchor_mask_ratio=0.25, decoder_block="croco"))
    assert counts["linear"] + counts["conv"] == encoder + decoder
    assert counts["layernorm"] == layernorm
    assert counts["fvcore"] / 1e9 == pytest.approx(11.15, abs=0.005)  # an integer count, written to 0.01 G
