"""SAM's mask decoder with the image-side work done once per image, not once per prompt. Exact algebra.

segment_anything's MaskDecoder copies the image embedding for every prompt and pushes each copy through
the two-way transformer. The copies differ only through low-rank terms, so this decoder keeps them
factored (N = h*w pixels, C channels, I = C/2 attention width, H heads of width d, T tokens, K = H*T):

- Block 1 sees the same image tokens X0 = embedding + no_mask_embed for every prompt: its token->image
  keys/values and image->token queries are computed once per image.
- The image->token attention changes the image tokens by sum_h A_h V_h Wo_h^T = A U: A [N, K] are the
  per-head attention weights, U [K, C] the tokens' values through out_proj, so rank <= K = 56 at vit_b.
- norm4 (LayerNorm over channels) of X0 + bo + A U is, per pixel, a scale r times (shared part centred
  once + A U centred) times gamma, plus beta. Its variance comes from the factors: |Sc|^2 (once per image),
  Sc.U^T = (Sc Wo) V^T (Sc Wo once per image) and A (Uc Uc^T) A^T, so E[x^2] - mean^2 never appears.
- Every later linear map W of the image tokens (block 2's keys/values/queries, the final attention's
  keys/values, and the first ConvTranspose2d of output_upscaling, whose 2x2 stride-2 kernel is a per-pixel
  linear map) is r * (shared W, once per image) + a rank-K product per prompt + per-pixel row terms.
  After block 2 the image tokens are r2 * (r1 * Ec + L^T R) * gamma2 + beta2 with L = [r1 A1; A2; 1] [K2, N].
- Attention scores and outputs never form the projected image tokens per prompt: q . (r S + L^T R W)^T is
  r (q S^T) + (q (R W)^T) L, which costs K instead of I per pixel and head-token.
- The final token->image attention only runs for the tokens the outputs read: the IoU token and the
  three multimask tokens.
- From the first LayerNorm2d + GELU of the upscaling on, the work is per prompt; it is a separate stage
  so that the mask generator can skip prompts whose three masks all fail the predicted-IoU filter.

Three stages, each a module of plain tensor ops (they export to ONNX / AOTInductor):
  SamImageTerms:   image embedding [1, C, h, w] -> ImageTerms (once per image)
  SamPromptTokens: ImageTerms[:-1], point prompts -> IoU predictions [P, 3] and the mask factors
  SamPromptMasks:  ImageTerms[-1:], mask factors -> low-res mask logits [P, 3, 4h, 4w]
The results equal MaskDecoder with multimask output up to float rounding. LayerNorm statistics are
computed in float32 (autocast off) also when the weights are bf16 or bf16 autocast is on.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import Tensor, nn

from corrclip.models.sam import dense_pe, embed_points


class ImageTerms(NamedTuple):
    """The prompt-independent tensors of one image. Terms that meet token queries or keys are stored
    transposed, [I, N], so that each head is a contiguous [d, N] block; [N] terms and the statistics'
    terms are float32, the others in the weights' dtype."""

    # block 1: attention projections of X0 = embedding + no_mask_embed (and its positional encoding P)
    k1: Tensor  # [I, N] token->image keys of X0 + P
    v1: Tensor  # [N, I] token->image values of X0
    q1: Tensor  # [I, N] image->token queries of X0 + P
    sc_sq: Tensor  # [N] |Sc|^2, Sc = X0 + out_proj.bias, centred over channels
    sc_wo1: Tensor  # [I, N] Sc Wo1: gives Sc . U1^T without forming U1
    # block 2: keys1 = r1 (E + A1^T W) + beta1 with E = Sc * gamma1
    e_k2: Tensor  # [I, N] E Wk^T
    pe_k2: Tensor  # [I, N] k_proj(P + beta1)
    e_v2: Tensor  # [N, I] E Wv^T
    e_q2: Tensor  # [I, N] E Wq^T (image->token queries)
    pe_q2: Tensor  # [I, N] q_proj(P + beta1)
    # block 2's norm4 statistics, with Ec = E centred
    ec_sq: Tensor  # [N] |Ec|^2
    ecg1_wo1: Tensor  # [I, N] (Ec * gamma1) Wo1c, Wo1c = Wo1 centred over its outputs: U1 centred = V Wo1c^T
    ec_wo2: Tensor  # [I, N] Ec Wo2
    ec_c: Tensor  # [N] Ec . (beta1 + bo2)
    # final token->image attention of keys2 = r2 (r1 Ec + L^T R) gamma2 + beta2
    ecg2_kf: Tensor  # [I, N] (Ec * gamma2) Wk^T
    pe_kf: Tensor  # [I, N] k_proj(P + beta2)
    ecg2_vf: Tensor  # [N, I] (Ec * gamma2) Wv^T
    # the first transposed convolution (the mask stage's only image input)
    ecg2_up: Tensor  # [N, 4 C/4] (Ec * gamma2) W_up


class MaskFactors(NamedTuple):
    """Per prompt, what the mask stage needs: the final image tokens in factored form."""

    scale: Tensor  # [P, N] r1 * r2, the per-pixel scale of the shared part
    left: Tensor  # [P, K2, N] r2 * L, L = [r1 A1; A2; 1] (K2 = 2 K + 1)
    right: Tensor  # [P, K2, C] R * gamma2, R = [W centred; U2 centred; (beta1 + bo2) centred]
    hyper: Tensor  # [P, 3, C/8] the hypernetwork outputs of the three multimask tokens


def _fp32() -> contextlib.AbstractContextManager:
    """Autocast off, so that LayerNorm statistics stay float32 (a no-op when autocast is off, e.g. in export)."""
    stack = contextlib.ExitStack()
    for dev in ("cpu", "cuda"):
        if torch.is_autocast_enabled(dev):
            stack.enter_context(torch.autocast(dev, enabled=False))
    return stack


def _heads(x: Tensor, heads: int) -> Tensor:
    """[..., I] -> [..., H, d], the head split of segment_anything's Attention."""
    return x.unflatten(-1, (heads, -1))


def _shared_scores(x: Tensor, image_t: Tensor) -> Tensor:
    """Per head, sum_d x[p, t, h, d] image[n, h, d] -> [H, P, T, N]; image_t is the image term transposed, [I, N]."""
    p, t, h, d = x.shape
    return torch.bmm(x.permute(2, 0, 1, 3).reshape(h, p * t, d), image_t.view(h, d, -1)).view(h, p, t, -1)


def _shared_values(attn: Tensor, image: Tensor) -> Tensor:
    """Per head, attn [H, P, T, N] times the image values [N, I] -> [P, T, I]."""
    h, p, t, n = attn.shape
    out = torch.bmm(attn.reshape(h, p * t, n), image.view(n, h, -1).transpose(0, 1))  # [H, P*T, d]
    return out.view(h, p, t, -1).permute(1, 2, 0, 3).reshape(p, t, -1)


def _low_rank_scores(x: Tensor, rows: Tensor, left: Tensor) -> Tensor:
    """Per head, x [P, T, H, d] against image rows left^T rows, never formed: [P, H*T, K] @ left [P, K, N].

    rows: [P, K, H, d]. -> [P, H, T, N].
    """
    p, t, h, _ = x.shape
    return torch.bmm(torch.einsum("pthd,pkhd->phtk", x, rows).flatten(1, 2), left).view(p, h, t, -1)


def _token_to_image(q: Tensor, keys: tuple[Tensor, Tensor, Tensor], values: tuple[Tensor, Tensor, Tensor],
                    scale: Tensor, left: Tensor) -> Tensor:
    """Attention of token queries q [P, T, H, d] (already divided by sqrt(d)) to image tokens that are, after
    a linear map, scale * shared + left^T rows + const, for keys (shared_t [I, N], rows, positional part
    [I, N]) and values (shared [N, I], rows, const [I]). scale: [P, N], left: [P, K, N], rows: [P, K, H, d].
    -> [P, T, I]. Scores and weights stay head-major, [H, P, T, N], with pixels innermost."""
    shared_k, rows_k, pos_k = keys
    shared_v, rows_v, const_v = values
    h = q.shape[2]
    s = torch.addcmul(_shared_scores(q, pos_k), _shared_scores(q, shared_k), scale[None, :, None, :])
    s += _low_rank_scores(q, rows_k, left).transpose(0, 1)
    attn = s.softmax(-1)
    mixed = torch.stack([torch.bmm(attn[i], left.mT) for i in range(h)], 2)  # [P, T, H, K], per head
    out = torch.einsum("pthk,pkhd->pthd", mixed, rows_v).flatten(-2)
    return out + _shared_values(attn * scale[None, :, None, :], shared_v) + const_v


class SharedDecoder(nn.Module):
    """The three stages over one SAM's prompt encoder and mask decoder (their weights, not copies)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        md = sam.mask_decoder
        if len(md.transformer.layers) != 2 or md.num_mask_tokens != 4:
            raise ValueError("the shared decoder is written for SAM's decoder: two blocks, four mask tokens")
        self.heads = md.transformer.layers[0].cross_attn_image_to_token.num_heads

    # ---- once per image ----
    def image_terms(self, image_embeddings: Tensor) -> ImageTerms:
        """image_embeddings [1, C, h, w] -> ImageTerms. Runs in float32 with autocast off (once per image)."""
        if image_embeddings.shape[0] != 1:
            raise ValueError(f"the shared decoder takes one image's embeddings, [1, C, h, w]; got "
                             f"{list(image_embeddings.shape)}: call it once per image")
        pe = self.prompt_encoder
        md = self.mask_decoder
        b1, b2, fin = md.transformer.layers[0], md.transformer.layers[1], md.transformer.final_attn_token_to_image
        dtype = md.iou_token.weight.dtype

        def lin(x: Tensor, layer: nn.Linear, bias: bool = True) -> Tensor:
            return F.linear(x, layer.weight.float(), layer.bias.float() if bias else None)

        with _fp32():
            x0 = image_embeddings[0].float().flatten(1).T + pe.no_mask_embed.weight.float()  # [N, C]
            pos = dense_pe(pe)[0].flatten(1).T
            sc = x0 + b1.cross_attn_image_to_token.out_proj.bias.float()
            sc = sc - sc.mean(-1, keepdim=True)
            g1, beta1 = b1.norm4.weight.float(), b1.norm4.bias.float()
            g2, beta2 = b2.norm4.weight.float(), b2.norm4.bias.float()
            wo1 = b1.cross_attn_image_to_token.out_proj.weight.float()  # [C, I]
            e = sc * g1
            ec = e - e.mean(-1, keepdim=True)
            ecg2 = ec * g2
            t = ImageTerms(
                k1=lin(x0 + pos, b1.cross_attn_token_to_image.k_proj).T,
                v1=lin(x0, b1.cross_attn_token_to_image.v_proj),
                q1=lin(x0 + pos, b1.cross_attn_image_to_token.q_proj).T,
                sc_sq=sc.square().sum(-1),
                sc_wo1=(sc @ wo1).T,
                e_k2=lin(e, b2.cross_attn_token_to_image.k_proj, bias=False).T,
                pe_k2=lin(pos + beta1, b2.cross_attn_token_to_image.k_proj).T,
                e_v2=lin(e, b2.cross_attn_token_to_image.v_proj, bias=False),
                e_q2=lin(e, b2.cross_attn_image_to_token.q_proj, bias=False).T,
                pe_q2=lin(pos + beta1, b2.cross_attn_image_to_token.q_proj).T,
                ec_sq=ec.square().sum(-1),
                ecg1_wo1=((ec * g1) @ (wo1 - wo1.mean(0))).T,
                ec_wo2=(ec @ b2.cross_attn_image_to_token.out_proj.weight.float()).T,
                ec_c=ec @ (beta1 + b2.cross_attn_image_to_token.out_proj.bias.float()),
                ecg2_kf=lin(ecg2, fin.k_proj, bias=False).T,
                pe_kf=lin(pos + beta2, fin.k_proj).T,
                ecg2_vf=lin(ecg2, fin.v_proj, bias=False),
                ecg2_up=ecg2 @ _upscale_weight(md).float(),
            )
        # the terms that feed matrix products take the weights' dtype; statistics terms stay float32
        stats = {"sc_sq", "sc_wo1", "ec_sq", "ecg1_wo1", "ec_wo2", "ec_c"}
        return ImageTerms(*(v.contiguous() if k in stats else v.to(dtype).contiguous()
                            for k, v in zip(ImageTerms._fields, t, strict=True)))

    # ---- per batch of prompts: the two-way transformer, the IoU head and the hypernetworks ----
    def prompt_tokens(self, terms: ImageTerms, point_coords: Tensor,
                      point_labels: Tensor) -> tuple[Tensor, MaskFactors]:
        """terms (all but ecg2_up), points [P, k, 2] (float64 as in the AMG), labels [P, k]
        -> IoU predictions [P, 3] and MaskFactors."""
        md = self.mask_decoder
        with _fp32():
            sparse = embed_points(self.prompt_encoder, point_coords, point_labels)
        p = sparse.shape[0]
        out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], 0)
        tokens = torch.cat([out_tokens[None].expand(p, -1, -1), sparse], 1)  # [P, T, C]: also the tokens' PE
        q, a1, vt1, u1, r1 = self._block1(terms, tokens)
        q, a1r, a2, vt2, u2 = self._block2(terms, tokens, q, a1, u1, r1)
        scale, left, right = self._block2_norm(terms, a1r, vt1, u1, r1, a2, vt2, u2)
        q = self._final_attention(terms, tokens, q, scale, left, right)
        iou = md.iou_prediction_head(q[:, 0])[:, 1:]
        hyper = torch.stack([md.output_hypernetworks_mlps[i](q[:, i]) for i in range(1, md.num_mask_tokens)], 1)
        return iou, MaskFactors(scale, left, right, hyper)

    def _block1(self, t: ImageTerms, tokens: Tensor) -> tuple[Tensor, ...]:
        """Block 1 (no PE in its self-attention): tokens, and the image update A1 U1 with norm4's scale r1.

        -> tokens [P, T, C], A1 [P, K, N], the tokens' values [P, T, H, d], U1 [P, K, C], r1 [P, N] (float32).
        """
        blk = self.mask_decoder.transformer.layers[0]
        h = self.heads
        q = blk.norm1(blk.self_attn(q=tokens, k=tokens, v=tokens))
        att = blk.cross_attn_token_to_image
        qq = _heads(att.q_proj(q + tokens), h)
        qq = qq / math.sqrt(qq.shape[-1])  # the attention's scaling, on the small side of each product
        attn = _shared_scores(qq, t.k1).softmax(-1)
        q = blk.norm2(q + att.out_proj(_shared_values(attn, t.v1)))
        q = blk.norm3(q + blk.mlp(q))
        # image -> token: per pixel and head, a softmax over the T tokens (dim 2, with pixels innermost)
        att = blk.cross_attn_image_to_token
        kt, vt = _heads(att.k_proj(q + tokens), h), _heads(att.v_proj(q), h)
        a1 = _shared_scores(kt / math.sqrt(kt.shape[-1]), t.q1).softmax(2)  # [H, P, T, N]
        u1 = torch.einsum("pthd,chd->phtc", vt, _heads(att.out_proj.weight, h)).flatten(1, 2)  # [P, K, C]
        with _fp32():  # norm4: var = (|Sc|^2 + 2 A.(Sc U^T) + A (Uc Uc^T) A^T) / C
            cross = (a1.float() * _shared_scores(vt.float(), t.sc_wo1)).sum((0, 2))
            a1 = a1.transpose(0, 1).flatten(1, 2)  # [P, K, N], K = (head, token) as in U1
            a, u = a1.float(), u1.float()
            uc = u - u.mean(-1, keepdim=True)
            quad = (torch.bmm(uc @ uc.mT, a) * a).sum(1)
            var = (t.sc_sq + 2 * cross + quad) / u.shape[-1]
            r1 = torch.rsqrt(var.clamp(min=0) + blk.norm4.eps)
        return q, a1, vt, u1, r1

    def _block2(self, t: ImageTerms, tokens: Tensor, q: Tensor, a1: Tensor, u1: Tensor,
                r1: Tensor) -> tuple[Tensor, ...]:
        """Block 2 on keys1 = r1 (E + A1^T W) + beta1, W = (U1 centred) * gamma1, never formed per prompt.

        -> tokens, r1 A1 [P, K, N], A2 [P, K, N], the tokens' values [P, T, H, d], U2 [P, K, C].
        """
        tf = self.mask_decoder.transformer
        blk, g1, beta1 = tf.layers[1], tf.layers[0].norm4.weight, tf.layers[0].norm4.bias
        h = self.heads
        w = (u1 - u1.mean(-1, keepdim=True)) * g1  # [P, K, C]
        r = r1.to(q.dtype)
        a1r = a1 * r[:, None, :]  # keys1's low-rank part carries norm4's scale too
        sa = q + tokens
        q = blk.norm1(q + blk.self_attn(q=sa, k=sa, v=q))
        att = blk.cross_attn_token_to_image
        qq = _heads(att.q_proj(q + tokens), h)
        qq = qq / math.sqrt(qq.shape[-1])
        keys = t.e_k2, _heads(F.linear(w, att.k_proj.weight), h), t.pe_k2
        # (a functional call: a module called on a parameter trips FlopCounterMode's module tracker)
        values = t.e_v2, _heads(F.linear(w, att.v_proj.weight), h), F.linear(beta1, *_weight_bias(att.v_proj))
        q = blk.norm2(q + att.out_proj(_token_to_image(qq, keys, values, r, a1r)))
        q = blk.norm3(q + blk.mlp(q))
        # image -> token: image queries r1 (E Wq^T + A1^T W Wq^T) + q_proj(P + beta1) against the tokens' keys
        att = blk.cross_attn_image_to_token
        kt, vt = _heads(att.k_proj(q + tokens), h), _heads(att.v_proj(q), h)
        kt = kt / math.sqrt(kt.shape[-1])
        s = _low_rank_scores(kt, _heads(F.linear(w, att.q_proj.weight), h), a1r)  # [P, H, T, N]
        s.addcmul_(_shared_scores(kt, t.e_q2).transpose(0, 1), r[:, None, None, :])
        s += _shared_scores(kt, t.pe_q2).transpose(0, 1)
        a2 = s.softmax(2).flatten(1, 2)  # [P, K, N]
        u2 = torch.einsum("pthd,chd->phtc", vt, _heads(att.out_proj.weight, h)).flatten(1, 2)
        return q, a1r, a2, vt, u2

    def _block2_norm(self, t: ImageTerms, a1r: Tensor, vt1: Tensor, u1: Tensor, r1: Tensor, a2: Tensor, vt2: Tensor,
                     u2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Block 2's norm4 of r1 (Ec + A1^T Wc) + A2^T U2c + cc (all centred; c = beta1 + bo2) = r1 Ec + L^T R,
        with L = [r1 A1; A2; 1] [P, K2, N] and R = [Wc; U2c; cc] [P, K2, C].

        -> (r1 r2, r2 L, R * gamma2) in the working dtype; the statistics in float32.
        """
        tf = self.mask_decoder.transformer
        g1, beta1 = tf.layers[0].norm4.weight.float(), tf.layers[0].norm4.bias.float()
        norm = tf.layers[1].norm4
        dtype = a2.dtype
        with _fp32():
            u1, u2, a1r, a2 = u1.float(), u2.float(), a1r.float(), a2.float()
            p, _, n = a2.shape
            h = self.heads
            mu1 = u1.mean(-1, keepdim=True)
            wc = (u1 - mu1) * g1
            c = beta1 + tf.layers[1].cross_attn_image_to_token.out_proj.bias.float()
            right = torch.cat([wc - wc.mean(-1, keepdim=True), u2 - u2.mean(-1, keepdim=True),
                               (c - c.mean()).expand(p, 1, -1)], 1)
            left = torch.cat([a1r, a2, a2.new_ones(p, 1, n)], 1)
            # <Ec, L^T R> from the shared products: Ec Wc^T = (Ec g1) (U1 centred)^T, Ec U2^T, Ec . c
            x1 = (a1r.view(p, h, -1, n) * _shared_scores(vt1.float(), t.ecg1_wo1).transpose(0, 1)).sum((1, 2))
            x2 = (a2.view(p, h, -1, n) * _shared_scores(vt2.float(), t.ec_wo2).transpose(0, 1)).sum((1, 2))
            cross = x1 + x2 + t.ec_c
            quad = (torch.bmm(right @ right.mT, left) * left).sum(1)
            var = (r1.square() * t.ec_sq + 2 * r1 * cross + quad) / right.shape[-1]
            r2 = torch.rsqrt(var.clamp(min=0) + norm.eps)
            out = (r1 * r2, left * r2[:, None, :], right * norm.weight.float())
        return tuple(x.to(dtype) for x in out)

    def _final_attention(self, t: ImageTerms, tokens: Tensor, q: Tensor, scale: Tensor, left: Tensor,
                         right: Tensor) -> Tensor:
        """The final token->image attention, for the tokens the outputs read: IoU and the multimask tokens."""
        tf = self.mask_decoder.transformer
        att, beta2 = tf.final_attn_token_to_image, tf.layers[1].norm4.bias
        used = [0] + list(range(2, 1 + self.mask_decoder.num_mask_tokens))
        q, pe = q[:, used], tokens[:, used]
        h = self.heads
        qq = _heads(att.q_proj(q + pe), h)
        qq = qq / math.sqrt(qq.shape[-1])
        keys = t.ecg2_kf, _heads(F.linear(right, att.k_proj.weight), h), t.pe_kf
        values = t.ecg2_vf, _heads(F.linear(right, att.v_proj.weight), h), F.linear(beta2, *_weight_bias(att.v_proj))
        return tf.norm_final_attn(q + att.out_proj(_token_to_image(qq, keys, values, scale, left)))

    # ---- per prompt whose masks are wanted: output_upscaling and the hypernetwork product ----
    def prompt_masks(self, ecg2_up: Tensor, f: MaskFactors) -> Tensor:
        """ImageTerms.ecg2_up and MaskFactors of P prompts -> low-res logits [P, 3, 4h, 4w].

        Both transposed convolutions (kernel 2, stride 2) are per-pixel matrix products here, with the
        channels last: LayerNorm2d becomes a layer_norm over the last dimension, and the 2x2 blocks are
        put in place only once, on the three output masks.
        """
        md = self.mask_decoder
        up1, norm, act1, up2, act2 = md.output_upscaling
        gh, gw = self.prompt_encoder.image_embedding_size
        p = f.scale.shape[0]
        beta2 = md.transformer.layers[1].norm4.bias
        w1 = _upscale_weight(md)
        const = beta2 @ w1 + up1.bias.repeat(4)
        x = torch.baddbmm(const, f.left.mT, f.right @ w1)  # [P, N, (a, b, C/4)] (not in place: FLOPs are counted)
        x.addcmul_(f.scale[..., None], ecg2_up)
        x = act1(F.layer_norm(x.view(p, -1, up1.out_channels), (up1.out_channels,), norm.weight, norm.bias, norm.eps))
        w2 = up2.weight.permute(0, 2, 3, 1).flatten(1)  # [C/4, (a', b', C/8)]
        x = act2(torch.addmm(up2.bias.repeat(4), x.view(-1, up1.out_channels), w2))
        masks = torch.bmm(f.hyper, x.view(p, -1, up2.out_channels).mT)  # [P, 3, (i, j, a, b, a', b')]
        masks = masks.view(p, -1, gh, gw, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
        return masks.reshape(p, -1, 4 * gh, 4 * gw)


def _weight_bias(layer: nn.Linear) -> tuple[Tensor, Tensor]:
    return layer.weight, layer.bias


def _upscale_weight(md: nn.Module) -> Tensor:
    """The first ConvTranspose2d (kernel 2, stride 2) as a per-pixel map [C, (a, b, C/4)]: output pixel
    (2i + a, 2j + b) takes channels (a, b, :) of input pixel (i, j)."""
    return md.output_upscaling[0].weight.permute(0, 2, 3, 1).flatten(1)


class SamImageTerms(nn.Module):
    """Export wrapper: image embeddings [1, C, h, w] -> the ImageTerms tuple."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.dec = SharedDecoder(sam)

    def forward(self, image_embeddings: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.dec.image_terms(image_embeddings))


class SamPromptTokens(nn.Module):
    """Export wrapper: ImageTerms but the last, point coords, labels -> (iou_predictions, *MaskFactors).

    The terms are named parameters: exporters need a fixed signature."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.dec = SharedDecoder(sam)

    def forward(self, k1: Tensor, v1: Tensor, q1: Tensor, sc_sq: Tensor, sc_wo1: Tensor, e_k2: Tensor, pe_k2: Tensor,
                e_v2: Tensor, e_q2: Tensor, pe_q2: Tensor, ec_sq: Tensor, ecg1_wo1: Tensor, ec_wo2: Tensor,
                ec_c: Tensor, ecg2_kf: Tensor, pe_kf: Tensor, ecg2_vf: Tensor, point_coords: Tensor,
                point_labels: Tensor) -> tuple[Tensor, ...]:
        terms = ImageTerms(k1, v1, q1, sc_sq, sc_wo1, e_k2, pe_k2, e_v2, e_q2, pe_q2, ec_sq, ecg1_wo1, ec_wo2, ec_c,
                           ecg2_kf, pe_kf, ecg2_vf, ecg2_up=None)
        iou, factors = self.dec.prompt_tokens(terms, point_coords, point_labels)
        return (iou, *factors)


class SamPromptMasks(nn.Module):
    """Export wrapper: ImageTerms.ecg2_up, *MaskFactors -> low-res logits [P, 3, 4h, 4w]."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.dec = SharedDecoder(sam)

    def forward(self, ecg2_up: Tensor, scale: Tensor, left: Tensor, right: Tensor, hyper: Tensor) -> Tensor:
        return self.dec.prompt_masks(ecg2_up, MaskFactors(scale, left, right, hyper))
