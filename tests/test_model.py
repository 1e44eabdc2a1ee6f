"""TextDiffHead: the paper's parameter count, shapes per fusion, text masking, config round trip."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from train.nets.head import CrossAttention, TextDiffHead, count_parameters, sinusoidal_2d
from train.runs.loading import load_head, save_head

MONUSEG = [1536, 1536, 768, 768]
BLOCK_768 = 3_745_536  # one transformer block at dim 768, text 768
TINY = dict(in_channels=[16, 32, 32], text_dim=24, dim=32, heads=2, head_dim=8, head_channels=(8, 4))
SIZES = [4, 8, 16]


def tiny(seed: int = 0, **kw) -> TextDiffHead:
    torch.manual_seed(seed)
    return TextDiffHead(**{**TINY, **kw}).eval()


def inputs(seed: int = 1, batch: int = 2, length: int = 5):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(batch, c, s, s, generator=g) for c, s in zip(TINY["in_channels"], SIZES)]
    tokens = torch.randn(batch, length, TINY["text_dim"], generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, -2:] = False  # last two tokens are padding
    return feats, tokens, mask


@torch.no_grad()
def run(model: TextDiffHead, feats, tokens, mask, out_size=16) -> torch.Tensor:
    return model(feats, tokens, mask, out_size=out_size)


# ---------------------------------------------------------------- parameter counts (paper config)

def test_paper_parameter_count_is_exact():
    head = TextDiffHead(in_channels=MONUSEG, text_dim=768)
    assert count_parameters(head) == 9_683_234
    # 1x1 convs 1536*768 + 768 for the two 1536-channel scales, identity for the 768 ones
    assert [count_parameters(p) for p in head.proj] == [1_180_416, 1_180_416, 0, 0]
    assert isinstance(head.proj[2], nn.Identity) and isinstance(head.proj[3], nn.Identity)
    assert len(head.blocks) == 1 and count_parameters(head.blocks) == BLOCK_768
    # 3x3 3072→128 +BN, 128→32 +BN, 32→2
    assert count_parameters(head.classifier) == (3072 * 128 * 9 + 128 + 256) + (128 * 32 * 9 + 32 + 64) + (32 * 2 * 9 + 2)
    assert count_parameters(head.classifier) == 3_576_866


def test_block_count_matches_hand_sum():
    d, inner = 768, 512
    attn = 3 * d * inner + (inner * d + d) + 2 * d  # q,k,v no bias; out Linear + LayerNorm
    assert 3 * 2 * d + 2 * attn + (d * d + d) == BLOCK_768


def test_fusion_ablation_parameter_counts():
    none = TextDiffHead(in_channels=MONUSEG, fusion="none")
    concat = TextDiffHead(in_channels=MONUSEG, fusion="concat")
    assert count_parameters(none) == 9_683_234 - BLOCK_768
    # text Linear 768→768 and one more 768-channel map into the first 3x3 conv
    assert count_parameters(concat) == count_parameters(none) + (768 * 768 + 768) + 768 * 128 * 9
    assert len(none.blocks) == 0 and len(concat.blocks) == 0


def test_shared_vs_per_scale_block_count():
    shared, per_scale = tiny(), tiny(shared_block=False)
    one_block = count_parameters(shared.blocks[0])
    assert len(shared.blocks) == 1 and len(per_scale.blocks) == 3
    assert count_parameters(per_scale) == count_parameters(shared) + 2 * one_block


def test_dropout_default_is_authors_zero():
    head = tiny()
    assert head.config["dropout"] == 0.0
    drops = [m for m in head.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 3 and all(m.p == 0.0 for m in drops)  # attn1 output, attn2 output, FF
    assert all(m.p == 0.3 for m in tiny(dropout=0.3).modules() if isinstance(m, nn.Dropout))


# ---------------------------------------------------------------- forward shapes

@pytest.mark.parametrize("fusion", ["cross-attn", "concat", "none"])
@pytest.mark.parametrize("out_size, expect", [(16, (16, 16)), ((20, 24), (20, 24)), (None, (16, 16))])
def test_output_shapes(fusion, out_size, expect):
    head = tiny(fusion=fusion)
    feats, tokens, mask = inputs()
    out = run(head, feats, tokens, mask, out_size)
    assert out.shape == (2, 2, *expect) and torch.isfinite(out).all()


def test_half_precision_inputs_are_cast():
    head = tiny()
    feats, tokens, mask = inputs()
    ref = run(head, feats, tokens, mask)
    half = run(head, [f.half() for f in feats], tokens.half(), mask)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, ref, atol=5e-2, rtol=0)


def test_backward_reaches_every_parameter():
    head = tiny().train()
    feats, tokens, mask = inputs()
    head(feats, tokens, mask, out_size=16).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="fusion"):
        tiny(fusion="film")
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny(dim=30, pos_enc=True)
    feats, tokens, mask = inputs()
    with pytest.raises(ValueError, match="needs text tokens"):
        tiny()(feats, None)
    with pytest.raises(ValueError, match="feature maps"):
        tiny()(feats[:2], tokens, mask)


# ---------------------------------------------------------------- text usage and masking

def test_no_text_ignores_tokens():
    head = tiny(fusion="none")
    feats, tokens, mask = inputs()
    ref = run(head, feats, tokens, mask)
    assert torch.equal(run(head, feats, torch.randn_like(tokens), mask), ref)
    assert torch.equal(run(head, feats, None, None), ref)


@pytest.mark.parametrize("fusion", ["cross-attn", "concat"])
def test_text_fusions_use_tokens(fusion):
    head = tiny(fusion=fusion)
    feats, tokens, mask = inputs()
    changed = tokens.clone()
    changed[:, 0] += 1.0  # a real (unmasked) token
    assert not torch.allclose(run(head, feats, changed, mask), run(head, feats, tokens, mask), atol=1e-4)


@pytest.mark.parametrize("fusion", ["cross-attn", "concat"])
def test_padding_tokens_have_zero_weight(fusion):
    head = tiny(fusion=fusion)
    feats, tokens, mask = inputs()
    changed = tokens.clone()
    changed[:, -2:] = 100.0 * torch.randn_like(changed[:, -2:])  # masked-out tokens only
    ref = run(head, feats, tokens, mask)
    torch.testing.assert_close(run(head, feats, changed, mask), ref, atol=1e-5, rtol=0)
    # the same change is visible once those tokens are unmasked
    full = torch.ones_like(mask)
    assert not torch.allclose(run(head, feats, changed, full), run(head, feats, tokens, full), atol=1e-4)


def test_sample_without_valid_tokens_is_finite_and_ignores_text():
    head = tiny()
    feats, tokens, mask = inputs()
    mask[1] = False  # sample 1 has no real token at all
    out = run(head, feats, tokens, mask)
    assert torch.isfinite(out).all()
    out2 = run(head, feats, torch.randn_like(tokens), mask)
    torch.testing.assert_close(out2[1], out[1], atol=1e-5, rtol=0)  # nothing attended
    # sample 0 is unaffected by its neighbour's mask
    alone = run(head, [f[:1] for f in feats], tokens[:1], mask[:1])
    torch.testing.assert_close(alone, out[:1], atol=1e-5, rtol=1e-5)


def test_cross_attention_single_token_is_value_projection():
    # one key: softmax weight 1 → output = to_out(to_v(token)) for every query
    torch.manual_seed(0)
    attn = CrossAttention(dim=8, context_dim=6, heads=2, head_dim=4).eval()
    x, ctx = torch.randn(3, 5, 8), torch.randn(3, 1, 6)
    with torch.no_grad():
        expected = attn.to_out(attn.to_v(ctx)).expand(3, 5, 8)
        torch.testing.assert_close(attn(x, ctx), expected)
        # a second, masked-out token changes nothing; an all-masked sample gives exactly 0
        ctx2 = torch.cat([ctx, torch.randn(3, 1, 6)], dim=1)
        m = torch.tensor([[True, False]] * 3)
        torch.testing.assert_close(attn(x, ctx2, m), expected)
        m[2] = False
        out = attn(x, ctx2, m)
        assert torch.equal(out[2], torch.zeros(5, 8))


# ---------------------------------------------------------------- position code

def test_sinusoidal_2d_hand_values():
    pe = sinusoidal_2d(2, 3, 8)  # quarter = 2, ω = (1, 1/100)
    assert pe.shape == (8, 2, 3)
    torch.testing.assert_close(pe[:, 0, 0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    # row y=1, column x=2: y half = sin(1), sin(.01), cos(1), cos(.01); x half with p=2
    expect = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01),
              math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]
    torch.testing.assert_close(pe[:, 1, 2], torch.tensor(expect))


def test_pos_enc_changes_output_without_parameters():
    plain, coded = tiny(), tiny(pos_enc=True)
    coded.load_state_dict(plain.state_dict())
    assert count_parameters(coded) == count_parameters(plain)
    feats, tokens, mask = inputs()
    assert not torch.allclose(run(coded, feats, tokens, mask), run(plain, feats, tokens, mask), atol=1e-4)


def test_text_gate_starts_as_no_text_and_opens_by_training():
    gated = tiny(text_gate=True)
    assert count_parameters(gated) == count_parameters(tiny()) + 3  # the block's three α
    feats, tokens, mask = inputs()
    other = inputs(seed=7)[1]
    silent = torch.zeros_like(mask)
    # closed gates: the block is the identity, so the text (its content, or none at all) changes nothing
    assert torch.equal(run(gated, feats, tokens, mask), run(gated, feats, other, mask))
    assert torch.equal(run(gated, feats, tokens, mask), run(gated, feats, tokens, silent))
    gated.train()
    gated(feats, tokens, mask, out_size=16).square().mean().backward()
    block = gated.blocks[0]
    assert block.gate.grad is not None and bool((block.gate.grad[:2] != 0).all())  # the text branches' α learn
    assert block.attn1.to_q.weight.grad.abs().max() == 0  # nothing reaches the attention through a closed gate
    with torch.no_grad():
        block.gate.fill_(0.005)  # tanh(0.5), GATE_SCALE 100
    gated.eval()
    assert not torch.allclose(run(gated, feats, tokens, mask), run(gated, feats, other, mask), atol=1e-5)
    with pytest.raises(ValueError, match="text_gate .* needs fusion 'cross-attn'"):
        tiny(text_gate=True, fusion="concat")


# ---------------------------------------------------------------- config

def test_config_save_load_round_trip(tmp_path):
    head = tiny(fusion="concat", shared_block=False, pos_enc=True, dropout=0.1, norm="batch")
    head.init_weights()
    with torch.no_grad():  # non-default BN statistics must travel too
        head.classifier[1].running_mean.uniform_(-1, 1)
    cfg = head.config
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg == dict(in_channels=[16, 32, 32], text_dim=24, dim=32, heads=2, head_dim=8, head_channels=[8, 4],
                       num_classes=2, dropout=0.1, fusion="concat", shared_block=False, pos_enc=True,
                       norm="batch", no_text_classifier=False, text_gate=False)
    save_head(head, tmp_path / "head")
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_head(tmp_path / "head").eval()
    assert loaded.config == cfg
    feats, tokens, mask = inputs()
    assert torch.equal(run(loaded, feats, tokens, mask), run(head, feats, tokens, mask))


def test_image_norm_is_batchnorm_at_batch_one_and_batch_invariant():
    from train.nets.head import ImageNorm

    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6) * 3 + 1
    norm, bn = ImageNorm(4), torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        for m in (norm, bn):
            m.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
            m.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))
    bn.train()
    torch.testing.assert_close(norm(x[:1]), bn(x[:1]))  # training at batch 1: identical to BatchNorm
    norm.eval()
    whole = norm(x)
    for i in range(3):  # evaluation: each image on its own, whatever the batch
        torch.testing.assert_close(whole[i:i + 1], norm(x[i:i + 1]))
    assert set(norm.state_dict()) == {"weight", "bias"}
    head = TextDiffHead(in_channels=[1536, 1536, 768, 768], text_dim=768)
    assert count_parameters(head) == 9_683_234 == count_parameters(TextDiffHead([1536, 1536, 768, 768], norm="batch"))


def test_init_weights_is_authors_normal():
    head = TextDiffHead(in_channels=[64], text_dim=16, dim=32, heads=2, head_dim=8, head_channels=(8,))
    head.init_weights(std=0.02)
    w = head.proj[0].weight
    assert abs(w.std().item() - 0.02) < 0.003 and torch.equal(head.proj[0].bias, torch.zeros(32))
    assert torch.equal(head.blocks[0].norm1.weight, torch.ones(32))  # LayerNorm untouched


def test_few_token_attention_equals_the_standard_path():
    """L < head_dim uses the reassociated products; the same function as projecting every pixel."""
    from train.nets.head import CrossAttention

    torch.manual_seed(0)
    attn = CrossAttention(32, 24, heads=4, head_dim=16)
    x, ctx = torch.randn(2, 50, 32), torch.randn(2, 5, 24)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    fast = attn(x, ctx, mask)
    padded = torch.cat([ctx, torch.randn(2, 16, 24)], 1)  # 21 tokens >= head_dim: the standard path
    slow = attn(x, padded, torch.cat([mask, torch.zeros(2, 16, dtype=torch.bool)], 1))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    assert fast[1].abs().max() == 0  # no valid token: nothing added


# ---------------------------------------------------------------- a classifier of their own for text-less samples

@pytest.mark.parametrize("impl", ["fast", "literal"])
def test_a_text_less_sample_takes_the_no_text_classifier(impl):
    """In a batch, a sample with no valid token is ζ1's head with this head's projections and its no-text
    classifier; the samples with text are the text path alone (as in a batch of their own)."""
    head = tiny(no_text_classifier=True, pos_enc=True)
    head.init_weights()
    feats, tokens, mask = inputs(batch=3)
    mask[1] = False
    got = head(feats, tokens, mask, out_size=16, impl=impl)

    notext = tiny(fusion="none", pos_enc=True)
    notext.proj.load_state_dict(head.proj.state_dict())
    notext.classifier.load_state_dict(head.no_text_classifier.state_dict())
    alone = notext([f[1:2] for f in feats], out_size=16, impl=impl)
    torch.testing.assert_close(got[1:2], alone, rtol=0, atol=0)
    with_text = head([f[[0, 2]] for f in feats], tokens[[0, 2]], mask[[0, 2]], out_size=16, impl=impl)
    torch.testing.assert_close(got[[0, 2]], with_text, rtol=1e-6, atol=1e-6)
    plain = tiny(pos_enc=True)
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("no_text_classifier")})
    torch.testing.assert_close(plain(feats, tokens, mask, out_size=16, impl=impl)[[0, 2]], with_text,
                               rtol=1e-6, atol=1e-6)  # the text path is the head without the classifier
    assert not torch.equal(plain(feats, tokens, mask, out_size=16, impl=impl)[1], got[1])


def test_a_text_less_sample_trains_only_the_no_text_classifier():
    """The no-text classifier reads the projections detached: a text-less sample's loss reaches nothing else,
    and a sample with text never reaches it."""
    head = tiny(no_text_classifier=True).train()
    feats, tokens, mask = inputs(batch=2)
    mask[0] = False
    out = head(feats, tokens, mask, out_size=16)
    own = {n for n, _ in head.named_parameters() if n.startswith("no_text_classifier.")}
    for sample, reached in ((0, own), (1, {n for n, _ in head.named_parameters()} - own)):
        head.zero_grad(set_to_none=True)
        out[sample].sum().backward(retain_graph=True)
        grads = {n for n, p in head.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert grads == reached, sample


def test_the_no_text_classifier_needs_a_text_head_and_adds_zeta1s_classifier():
    with pytest.raises(ValueError, match="no_text_classifier needs a head that reads text"):
        tiny(fusion="none", no_text_classifier=True)
    extra = count_parameters(tiny(no_text_classifier=True)) - count_parameters(tiny())
    assert extra == count_parameters(tiny(fusion="none").classifier)
