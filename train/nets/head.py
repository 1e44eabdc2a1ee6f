"""The trainable TextDiff head: per-scale text cross-attention → upsample → concat → conv classifier.

Shapes for the MoNuSeg config (blocks {6,8,12,16} × 3 steps, 256² output)::

    feats   [(B,1536,32,32), (B,1536,64,64), (B,768,128,128), (B,768,256,256)]
    proj    1x1 conv → (B,768,h,w) each (identity where channels already equal ``dim``)
    block   (B,h*w,768) pixels attend to tokens (B,L,text_dim), one block shared by all scales
    concat  bilinear → (B,4*768,256,256)
    logits  (B,num_classes,256,256)

``forward`` computes the upsample → concat → first conv step without the full-resolution concat
(:mod:`train.nets.fastconv`, the same function; ``impl="literal"`` or ``head.impl = "literal"`` for the
literal computation).

With the defaults this is the paper's "9.68 M" head: exactly 9,683,234 trainable parameters.
The constructor arguments are the config (``config``); :func:`train.runs.loading.save_head` / ``load_head``
write and read a run folder's layout, so ``load_head(run)`` loads a fitted run's head.
:class:`train.config.TextDiffArgs` are the arguments a fit chooses (the rest come from the store).
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.config import FUSIONS, NORMS
from train.nets.fastconv import fused_first_conv

__all__ = ["TextDiffHead", "TextCrossBlock", "CrossAttention", "FUSIONS", "NORMS",
           "count_parameters", "sinusoidal_2d", "IMPLS"]

IMPLS = ("fast", "literal")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable (``requires_grad``) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def sinusoidal_2d(h: int, w: int, dim: int, device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Fixed 2-D sine/cosine position code, shape (dim, h, w); ``dim`` must be divisible by 4.

    Channels ``[0, dim/2)`` encode the row y, ``[dim/2, dim)`` the column x; within each half,
    ``[sin(p·ω_k) for k] + [cos(p·ω_k) for k]`` with ω_k = 10000^(-k/(dim/4)), k = 0..dim/4-1.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sinusoidal code needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, device=device, dtype=torch.float64) / quarter)

    def axis(n: int) -> Tensor:  # (n, dim/2)
        angle = torch.arange(n, device=device, dtype=torch.float64)[:, None] * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    ey = axis(h)[:, None, :].expand(h, w, 2 * quarter)
    ex = axis(w)[None, :, :].expand(h, w, 2 * quarter)
    return torch.cat([ey, ex], dim=2).permute(2, 0, 1).to(dtype)


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, N, dim) over context tokens (B, L, context_dim).

    q/k/v projections have no bias; the output is Linear(heads·head_dim → dim) + LayerNorm + Dropout
    (the authors' diffusers-derived ``CrossAttention``). ``mask`` (B, L) bool, True = a real token:
    padding gets zero attention weight. A sample with no valid token attends to nothing: its whole
    output (after the projection and LayerNorm) is zero, so the residual branch adds nothing; no NaN.
    """

    def __init__(self, dim: int, context_dim: int, heads: int = 8, head_dim: int = 64, dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.LayerNorm(dim), nn.Dropout(dropout))

    def _split(self, t: Tensor) -> Tensor:  # (B, n, heads*head_dim) -> (B, heads, n, head_dim)
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        attn_mask = valid = None
        if mask is not None:
            valid = mask.to(torch.bool).any(dim=-1)  # (B,)
            if mask.device.type == "cpu" and bool(valid.all()):
                valid = None  # nothing to zero below (known without a device sync; a full-size pass saved)
            mask = mask.to(device=x.device, dtype=torch.bool)
            if valid is not None:
                valid = valid.to(x.device)
                # rows with no valid token get a dummy all-True mask (finite softmax), zeroed below
                mask = mask | ~valid[:, None]
            attn_mask = mask[:, None, None, :]
        if context.shape[1] < self.head_dim:
            out = self._few_tokens(x, context, attn_mask)
        else:
            q, k, v = self._split(self.to_q(x)), self._split(self.to_k(context)), self._split(self.to_v(context))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # scale = head_dim**-0.5
            out = self.to_out[0](out.transpose(1, 2).flatten(2))
        out = self.to_out[2](self.to_out[1](out))
        if valid is not None:
            out = out * valid[:, None, None].to(out.dtype)
        return out

    def _few_tokens(self, x: Tensor, context: Tensor, attn_mask: Tensor | None) -> Tensor:
        """The same attention, associated for L < head_dim tokens: per pixel O(heads·L·dim), not O(heads·head_dim·dim).

        scores_h = (x Wq_hᵀ) k_hᵀ = x (Wq_hᵀ k_hᵀ) and out = Σ_h P_h v_h Wout_hᵀ = Σ_h P_h (v_h Wout_hᵀ):
        the small (dim × L) products are formed once per sample instead of projecting every pixel to
        heads·head_dim channels. Same parameters, same function (up to float rounding).
        """
        b, n, dim = x.shape
        h, d, length = self.heads, self.head_dim, context.shape[1]
        k = self.to_k(context).view(b, length, h, d)
        v = self.to_v(context).view(b, length, h, d)
        wq = self.to_q.weight.view(h, d, dim)
        keys = torch.einsum("hdc,blhd->bchl", wq, k) * d ** -0.5            # (B, dim, H, L)
        scores = (x @ keys.reshape(b, dim, h * length)).view(b, n, h, length)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask.view(b, 1, 1, length), float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(b, n, h * length)
        wout = self.to_out[0].weight.view(dim, h, d)
        values = torch.einsum("blhd,chd->bhlc", v, wout).reshape(b, h * length, dim)  # (B, H·L, dim)
        return torch.baddbmm(self.to_out[0].bias, probs, values)  # the bias added in the product's pass


#: the text gate's α is read times this (:class:`TextCrossBlock`): at lr 1e-4 a gate can open within ~100 steps
GATE_SCALE = 100.0


class TextCrossBlock(nn.Module):
    """x += CrossAttn1(LN1 x, text); x += CrossAttn2(LN2 x, text); x += FF(LN3 x).

    Both attentions are cross-attentions to the text (the authors' ``BasicTransformerBlock`` with
    ``only_cross_attention=True``); FF = GELU → Dropout → Linear(dim → dim), as in their code.
    ``gated``: each of the three branches enters the residual times tanh(100·α), α learnt from 0 (Flamingo's
    gated cross-attention, ``gate`` holds the three α): at initialisation the block is the identity, the
    head ζ1's function, and the text comes in only as far as training opens the gates. The gate reads
    ``GATE_SCALE``·α: under Adam a parameter moves by about the learning rate per step, and a few-shot fit
    is a few hundred steps (MoNuSeg: 5 per epoch), so an unscaled α could not pass 0.05 at lr 1e-4.
    """

    def __init__(self, dim: int, context_dim: int, heads: int = 8, head_dim: int = 64, dropout: float = 0.0,
                 gated: bool = False):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, context_dim, heads, head_dim, dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim, dropout)
        self.ff = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.gate = nn.Parameter(torch.zeros(3)) if gated else None

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self._gated(0, self.attn1(self.norm1(x), context, mask))
        x = x + self._gated(1, self.attn2(self.norm2(x), context, mask))
        return x + self._gated(2, self.ff(self.norm3(x)))

    def _gated(self, i: int, branch: Tensor) -> Tensor:
        """Branch ``i`` as it enters the residual: as it is (the authors' block: no multiply on the
        full-resolution maps), or times tanh(GATE_SCALE·α_i)."""
        if self.gate is None:
            return branch
        return torch.tanh(GATE_SCALE * self.gate[i]).to(branch.dtype) * branch


class ImageNorm(nn.BatchNorm2d):
    """BatchNorm's parameters, normalised with each image's own statistics, in training and evaluation.

    The authors train with batch 1, where BatchNorm's training statistics are those of the one
    image; at evaluation they switch to running averages, which no training step ever saw. With text
    cross-attention that breaks: attention adds a text-dependent offset to every pixel, which the
    per-image statistics remove in training and the running averages do not. This keeps evaluation
    what training was (and makes predictions independent of the evaluation batch).
    """

    def __init__(self, num_features: int):
        super().__init__(num_features, track_running_stats=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)


def _conv_classifier(in_ch: int, hidden: Sequence[int], num_classes: int, norm: str = "image") -> nn.Sequential:
    """(3x3 conv + norm + ReLU) per hidden width, then a 3x3 conv to the classes; padding 1, bias."""
    layers: list[nn.Module] = []
    for width in hidden:
        bn = ImageNorm(width) if norm == "image" else nn.BatchNorm2d(width)
        layers += [nn.Conv2d(in_ch, width, 3, padding=1), bn, nn.ReLU()]
        in_ch = width
    layers.append(nn.Conv2d(in_ch, num_classes, 3, padding=1))
    return nn.Sequential(*layers)


def _masked_mean(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over valid tokens, (B, L, D) → (B, D); a sample with no valid token gives zeros."""
    if mask is None:
        return tokens.mean(dim=1)
    m = mask.to(device=tokens.device, dtype=tokens.dtype)[..., None]
    return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def _classify(classifier: nn.Sequential, maps: Sequence[Tensor], size: tuple[int, int], text: Tensor | None,
              impl: str) -> Tensor:
    """``classifier`` over the maps upsampled (bilinear) to ``size`` and concatenated (with ``text``, (B, dim),
    as one more constant map): "fast" without the full-resolution concat (:mod:`train.nets.fastconv`), "literal"
    with it."""
    if impl == "fast":
        conv = classifier[0]
        return classifier[1:](fused_first_conv(list(maps), size, conv.weight, conv.bias, text))
    maps = [F.interpolate(x.contiguous(), size=size, mode="bilinear", align_corners=False)
            if tuple(x.shape[-2:]) != size else x.contiguous() for x in maps]
    if text is not None:
        maps.append(text[:, :, None, None].expand(-1, -1, *size))
    return classifier(torch.cat(maps, dim=1))


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


class TextDiffHead(nn.Module):
    """TextDiff pixel classifier over cached multi-scale diffusion features and text tokens.

    Args:
        in_channels: channels per scale (3 steps × C of a block), e.g. [1536, 1536, 768, 768] (MoNuSeg).
        text_dim: text token width (768 Bio_ClinicalBERT, 384 MiniLM). Default 768.
        dim: projection and transformer width. Default 768.
        heads, head_dim: attention heads and per-head width. Default 8 × 64.
        head_channels: hidden widths of the conv classifier. Default (128, 32).
        num_classes: output classes. Default 2.
        dropout: dropout after each attention output and inside FF. Default 0.0, the authors' value
            (``BasicTransformerBlock(..., dropout=0.0)`` in their ``pixel_classifier``).
        fusion: "cross-attn" (the paper), "concat" (ablation ζ2: masked-mean text embedding →
            Linear(text_dim → dim) → one extra dim-channel map after upsampling) or "none"
            (ablation ζ1: no text). Default "cross-attn".
        shared_block: one transformer block shared by all scales (the authors); False = one per scale.
        pos_enc: add a fixed 2-D sinusoidal code (``sinusoidal_2d``) to each projected scale before
            the block (with "concat"/"none" it is added to the projected map). Default False (authors).
        norm: "image" (default): the classifier's BatchNorm layers use each image's statistics in
            training and evaluation (:class:`ImageNorm`; identical to BatchNorm in training at batch 1);
            "batch": BatchNorm with running statistics at evaluation, as the authors' code.
        no_text_classifier: a second classifier (ζ1's: the projected maps alone) for the samples that
            have no text (every token withheld), which reads the projections detached: a text-less sample
            trains only it, a sample with text only the rest (``fit --text-dropout P --dropout-classifier own``).
            Default False (a text-less sample goes through the text path with silent attention).
        text_gate: each text block's branches enter the residual gated by tanh(100·α), α learnt from 0
            (:class:`TextCrossBlock` ``gated``; needs fusion "cross-attn"). Default False (authors: ungated).

    The attribute ``impl`` ("fast", the default, or "literal") picks how :meth:`forward` computes the
    first classifier conv; it is not part of the config or the state_dict.
    """

    impl: str = "fast"

    def __init__(self, in_channels: Sequence[int], text_dim: int = 768, dim: int = 768, heads: int = 8,
                 head_dim: int = 64, head_channels: Sequence[int] = (128, 32), num_classes: int = 2,
                 dropout: float = 0.0, fusion: str = "cross-attn", shared_block: bool = True,
                 pos_enc: bool = False, norm: str = "image", no_text_classifier: bool = False,
                 text_gate: bool = False):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if not in_channels:
            raise ValueError("in_channels needs at least one scale")
        if pos_enc and dim % 4:
            raise ValueError(f"pos_enc needs dim divisible by 4, got {dim}")
        if no_text_classifier and fusion == "none":
            raise ValueError("no_text_classifier needs a head that reads text (fusion 'none' reads none)")
        if text_gate and fusion != "cross-attn":
            raise ValueError(f"text_gate gates the cross-attention blocks: it needs fusion 'cross-attn', got {fusion!r}")
        self._config: dict[str, Any] = dict(
            in_channels=[int(c) for c in in_channels], text_dim=int(text_dim), dim=int(dim), heads=int(heads),
            head_dim=int(head_dim), head_channels=[int(c) for c in head_channels], num_classes=int(num_classes),
            dropout=float(dropout), fusion=fusion, shared_block=bool(shared_block), pos_enc=bool(pos_enc),
            norm=norm, no_text_classifier=bool(no_text_classifier), text_gate=bool(text_gate))
        n = len(in_channels)
        self.fusion, self.dim, self.pos_enc = fusion, dim, pos_enc
        self._codes: dict[tuple[int, int, torch.device, torch.dtype], Tensor] = {}  # position codes by shape
        self.proj = nn.ModuleList(nn.Identity() if c == dim else nn.Conv2d(c, dim, 1) for c in in_channels)
        n_blocks = 0 if fusion != "cross-attn" else (1 if shared_block else n)
        self.blocks = nn.ModuleList(TextCrossBlock(dim, text_dim, heads, head_dim, dropout, text_gate)
                                    for _ in range(n_blocks))
        self.text_proj = nn.Linear(text_dim, dim) if fusion == "concat" else None
        n_maps = n + (fusion == "concat")
        self.classifier = _conv_classifier(n_maps * dim, head_channels, num_classes, norm)
        self.no_text_classifier = _conv_classifier(n * dim, head_channels, num_classes, norm) \
            if no_text_classifier else None

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-able (``TextDiffHead(**head.config)`` rebuilds it)."""
        return json.loads(json.dumps(self._config))

    def init_weights(self, std: float = 0.02) -> None:
        """The authors' ``init_weights('normal')``: conv/linear weights N(0, std), biases 0,
        BatchNorm weights N(1, std), BN biases 0; LayerNorm keeps its default (1, 0)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):  # ImageNorm too
                nn.init.normal_(m.weight, 1.0, std)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor], tokens: Tensor | None = None, token_mask: Tensor | None = None,
                out_size: int | Sequence[int] | None = None, impl: str | None = None) -> Tensor:
        """Logits (B, num_classes, H, W).

        Args:
            feats: one (B, in_channels[i], h_i, w_i) map per scale, at its native resolution.
            tokens: (B, L, text_dim) text token embeddings; unused (may be None) with fusion "none".
            token_mask: (B, L) bool, True = real token; None = all valid.
            out_size: H (square) or (H, W); None = the largest input scale's size.
            impl: "fast" (:func:`train.nets.fastconv.fused_first_conv`: no full-resolution concat) or
                "literal" (upsample, concat, conv); None = ``self.impl`` ("fast" unless set). Same function.
        """
        impl = impl or self.impl
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if len(feats) != len(self.proj):
            raise ValueError(f"expected {len(self.proj)} feature maps, got {len(feats)}")
        if self.fusion != "none" and tokens is None:
            raise ValueError(f"fusion {self.fusion!r} needs text tokens")
        dtype = self.classifier[0].weight.dtype
        size = _as_size(out_size) if out_size is not None else max(
            (tuple(f.shape[-2:]) for f in feats), key=lambda s: s[0] * s[1])
        if tokens is not None:
            tokens = tokens.to(dtype)
        feats = [f.to(dtype) for f in feats]
        has_text = self._routed(token_mask, len(feats[0]))
        if has_text is None:
            return self._text_path(feats, tokens, token_mask, size, impl)
        out = feats[0].new_empty((len(has_text), self.classifier[-1].out_channels, *size))
        device = feats[0].device
        none, text = (~has_text).nonzero().flatten().to(device), has_text.nonzero().flatten().to(device)
        if len(none):
            out[none] = self._no_text_path([f[none] for f in feats], size, impl).to(out.dtype)
        if len(text):
            out[text] = self._text_path([f[text] for f in feats], tokens[text.to(tokens.device)],
                                        token_mask[text.to(token_mask.device)], size, impl).to(out.dtype)
        return out

    def _routed(self, token_mask: Tensor | None, batch: int) -> Tensor | None:
        """With a no-text classifier: (B,) bool, which samples have a text (on the CPU); None when every sample
        takes the text path (no such classifier, or every sample has a text)."""
        if self.no_text_classifier is None or token_mask is None:
            return None
        has_text = token_mask.detach().to("cpu", torch.bool).reshape(batch, -1).any(dim=1)
        return None if bool(has_text.all()) else has_text

    def _text_path(self, feats: Sequence[Tensor], tokens: Tensor | None, token_mask: Tensor | None,
                   size: tuple[int, int], impl: str) -> Tensor:
        maps = [self._scale(i, f, tokens, token_mask, impl == "fast") for i, f in enumerate(feats)]
        text = self.text_proj(_masked_mean(tokens, token_mask)) if self.text_proj is not None else None
        return _classify(self.classifier, maps, size, text, impl)

    def _no_text_path(self, feats: Sequence[Tensor], size: tuple[int, int], impl: str) -> Tensor:
        """ζ1's computation with the head's projections (detached: no gradient reaches them from here) and
        the no-text classifier."""
        maps = [self._projected(i, f).detach() for i, f in enumerate(feats)]
        return _classify(self.no_text_classifier, maps, size, None, impl)

    def _projected(self, i: int, f: Tensor) -> Tensor:
        """Scale i's projection and position code, channels first (B, dim, h, w)."""
        x = self.proj[i](f)
        if self.pos_enc:
            x = x + self._position_code(*x.shape[-2:], x.device, x.dtype)
        return x

    def _position_code(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """:func:`sinusoidal_2d` (dim, h, w), computed once per shape, device and dtype (a constant: no grad, and
        a normal tensor even when first asked for under inference mode)."""
        key = (h, w, device, dtype)
        if key not in self._codes:
            with torch.inference_mode(False), torch.no_grad():
                self._codes[key] = sinusoidal_2d(h, w, self.dim, device, dtype)
        return self._codes[key]

    def _scale(self, i: int, f: Tensor, tokens: Tensor | None, token_mask: Tensor | None, fast: bool) -> Tensor:
        """Scale i at its native resolution: projection, position code, text block (B, dim, h, w).

        After a block the map is a channels-last view (no copy); the literal path makes it contiguous.
        With ``fast`` and a block, the 1×1 projection is one matmul that yields the block's pixel-major
        layout directly (no transposing copy before the first LayerNorm).
        """
        b, _, h, w = f.shape
        if not (fast and len(self.blocks)):
            x = self._projected(i, f)
            if not len(self.blocks):
                return x
            x = x.flatten(2).transpose(1, 2)
        else:
            proj = self.proj[i]
            x = f.flatten(2).transpose(1, 2)  # (B, h*w, C), a view
            if isinstance(proj, nn.Conv2d):
                x = F.linear(x, proj.weight.flatten(1), proj.bias)
            else:
                x = x.contiguous()
            if self.pos_enc:
                x = x + self._position_code(h, w, x.device, x.dtype).flatten(1).t()
        block = self.blocks[i if len(self.blocks) > 1 else 0]
        return block(x, tokens, token_mask).transpose(1, 2).unflatten(2, (h, w))
