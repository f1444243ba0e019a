"""Stage 04: TextRIN, the MIRO denoiser, with one token per reward.

The network of the paper's appendix B, in pixel space. A Recurrent Interface Network
(RIN, Jabri et al. 2023) splits its tokens in two:
  - the interface: one token per image patch (many tokens, narrow, width data_dim);
  - the latents: a few learned tokens (wide, width latent_dim) where the compute happens.
Each block: the latents cross-attend to the conditioning tokens, read from the patches
(cross-attention), think (K self-attention layers), and write back to the patches
(cross-attention). Every layer is pre-RMSNorm attention with QK-norm + a SwiGLU
feed-forward, attention through F.scaled_dot_product_attention.

The conditioning tokens are what MIRO adds:
    [ time token | reward token 1 ... reward token R | text tokens ]
A reward token = MLP(sinusoid(level)) + a learned embedding saying which reward it is,
where level = bin / (B - 1) in [0, 1] (03_bin.py). With R = 0 the same class is the
unconditioned baseline: it has no reward tokens at all.

Self-conditioning: what a previous pass made (detached) comes back as an input, so the network
refines its own guess across sampling steps. self_cond="latents" (RIN): its latents, added to
the initial latents; self_cond="image": its clean-image estimate, read through a zero-initialised
patch layer beside x_t (Chen et al. 2023, "Analog Bits"), so that each cell sees what the last
step drew there, without the noise. 05_train.py --self-cond says how often the first pass (without
gradients) runs in training.

What the network's raw output F stands for (prediction=):
  - "x" (the tiny preset): F is the clean image, and v = (x_t - F) / t, the velocity that
    leads from x_t to F (t clamped at T_MIN). A 16x16-pixel patch holds 768 values, more
    than its 256-wide token: the token cannot carry the noise that v = eps - x contains,
    but clean images are far simpler than noise, so it can carry the image (Li & He 2025,
    "Back to Basics: Let Denoising Generative Models Denoise").
  - "v": F is mixed with the input, v = c_skip(t) x_t + c_out(t) F (EDM-style
    preconditioning, Karras et al. 2022), where c_skip x_t is the best linear guess of
    v = eps - x from x_t alone (images of RMS sigma_data) and c_out the RMS of what it
    leaves: F learns a unit-variance target at every t.

Text: by default a small trainable transformer over open_clip's CLIP BPE tokenizer
(offline, no download). The denoiser only sees `encode_text`'s output, (B, L, latent_dim)
tokens and a (B, L) mask, so a frozen pretrained encoder can replace it
(`05_train.py --text-encoder`; the released MIRO uses google/flan-t5-xl): open_clip's CLIP
text tower or a T5 encoder, each with its own tokenizer, and a trained linear map from its
width to latent_dim.

    python 04_model.py                  # every preset: size, FLOPs, self-checks
    python 04_model.py --preset tiny

Prints, per preset: parameters, forward FLOPs per image (torch.utils.flop_counter), the
FLOPs of sampling one image with 50 Euler steps and multi-reward CFG, and runs a
forward/backward check and a check that every reward level changes the output.
"""
import argparse
import functools
import importlib.util
import logging
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

# Sizes. image_size/patch_size set the interface (patch tokens), num_latents x latent_dim
# the latents, num_blocks x num_layers the depth. `paper` has the released MIRO network's
# depth and latents (4 blocks x 4 layers, 256 latents x 1024, as its README states); the
# interface (256 tokens of width 256) is our choice for 256 px images. `tiny` cuts its 32 px
# images into 16x16-pixel patches, one token per cell of the shapes world's 2x2 layout, and
# predicts the clean image: with 4x4-pixel patches and v-prediction each patch denoised on
# its own and samples came out as patches of colour, not shapes. Its interface starts from the
# principal components of the training patches (interface="pca", fit_interface): a 768-value
# patch of the shapes world lies close to a 256-wide subspace, which PCA finds at once and
# gradient descent only after thousands of steps. Its patches read the caption themselves
# (patch_cond), start from distinct cell codes, and 16 latents are enough for four cells (a
# cheaper step buys more steps). Composition: the cells also read the caption through competing
# heads (patch_bind), so that two cells do not both take "a red circle" whole, and the text
# encoder sees neighbouring words (text_conv) and distances between words (text_rope), so that
# "red" is bound to "circle" and not to the square after it.
PRESETS = {
    "tiny": dict(image_size=32, patch_size=16, data_dim=256, latent_dim=128, num_latents=16, num_blocks=2,
                 num_layers=2, heads=4, text_dim=128, text_layers=2, text_len=64, prediction="x", patch_cond=True,
                 cell_codes="random", interface="pca", patch_bind=True, text_conv=3, text_rope=True),
    "small": dict(image_size=64, patch_size=4, data_dim=256, latent_dim=512, num_latents=128, num_blocks=4,
                  num_layers=2, heads=8, text_dim=512, text_layers=4, text_len=64),
    "paper": dict(image_size=256, patch_size=16, data_dim=256, latent_dim=1024, num_latents=256, num_blocks=4,
                  num_layers=4, heads=16, text_dim=512, text_layers=6, text_len=77),
}
VOCAB_SIZE = 49408  # open_clip's CLIP BPE vocabulary; 0 pads, 49406 starts, 49407 ends a caption
PAD_ID = 0          # the padding id of every tokenizer here (CLIP BPE, open_clip's, T5's)
T_MIN = 0.05        # x-prediction divides by t: below this the velocity's scale stops growing
STAGE = os.path.basename(sys.argv[0])  # 04_model.py run as a script, or the stage (05, 06, 07) using it: its error lines


# ----------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    """RMSNorm computed in at least float32 (bf16 squares lose precision), returned in the input dtype."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(dtype), (x.shape[-1],), self.weight.to(dtype), eps=1e-6).type_as(x)


class Attention(nn.Module):
    """Multi-head attention of queries x (B, N, dim) over context c (B, M, ctx_dim), with QK-norm.

    compete: in every head the softmax runs over the queries instead of the context, with a sink
    query of logit 0 beside them, as in slot
    attention (Locatello et al. 2020). Each context token is shared out among the queries, so two
    queries cannot both take a word whole: the cells of an image compete for the caption's phrases."""

    def __init__(self, dim, ctx_dim, heads, compete=False, rope=False):
        super().__init__()
        self.heads, inner = heads, min(dim, ctx_dim)  # narrow side sets the width, as in RIN
        self.rope = rope
        self.compete = compete
        self.q = nn.Linear(dim, inner, bias=False)
        self.kv = nn.Linear(ctx_dim, 2 * inner, bias=False)
        self.q_norm, self.k_norm = RMSNorm(inner // heads), RMSNorm(inner // heads)
        # After QK-norm a logit is at most sqrt(d) (4 for d = 16): too flat to pick out one patch or
        # latent. The q gain starts so that it is at most 8; it stays learned.
        nn.init.constant_(self.q_norm.weight, 8 / math.sqrt(inner // heads))
        self.out = nn.Linear(inner, dim)

    def forward(self, x, c, mask=None):
        B, N, M, H = x.shape[0], x.shape[1], c.shape[1], self.heads
        q = self.q(x).view(B, N, H, -1).transpose(1, 2)                  # (B, H, N, d)
        k, v = self.kv(c).view(B, M, 2, H, -1).permute(2, 0, 3, 1, 4)    # 2 x (B, H, M, d)
        q, k = self.q_norm(q), self.k_norm(k)  # QK-norm: bounded logits, stable in bf16
        if self.rope:  # self-attention over a sequence: logits that depend on the distance between tokens
            q, k = rotary(q), rotary(k)
        mask = None if mask is None else mask[:, None, None, :]          # (B, 1, 1, M), True = attend
        if not self.compete:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                   # (B, H, N, d)
        else:  # each context token shares itself out among the queries and a sink (logit 0) that takes the rest
            logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])                     # (B, H, N, M)
            logits = torch.cat([logits, torch.zeros_like(logits[:, :, :1])], 2)           # a sink of logit 0
            weights = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=2)
            y = (weights[:, :, :N].type_as(v) * (1 if mask is None else mask)) @ v
        return self.out(y.transpose(1, 2).reshape(B, N, -1))


def rotary(x):
    """Rotary position embedding (Su et al. 2021) of x (B, H, L, d): channel pairs (i, i + d/2) of
    token n turned by n * 10000^(-2i/d), so that q.k depends on where two tokens are relative to each
    other. Computed in at least float32."""
    L, d, dtype = x.shape[-2], x.shape[-1], torch.promote_types(x.dtype, torch.float32)
    freqs = torch.exp(-math.log(1e4) * torch.arange(d // 2, device=x.device, dtype=dtype) / (d // 2))
    angles = torch.arange(L, device=x.device, dtype=dtype)[:, None] * freqs            # (L, d/2)
    cos, sin = angles.cos(), angles.sin()
    a, b = x.to(dtype).chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).type_as(x)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward; hidden = 2/3 of 4x width (same parameters as a 4x GELU MLP), rounded to 64."""

    def __init__(self, dim):
        super().__init__()
        hidden = -(-int(8 * dim / 3) // 64) * 64
        self.gate_up = nn.Linear(dim, 2 * hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: attention (self, or cross when ctx_dim is given) + SwiGLU."""

    def __init__(self, dim, heads, ctx_dim=None, compete=False, rope=False):
        super().__init__()
        self.norm, self.norm_ctx = RMSNorm(dim), RMSNorm(ctx_dim) if ctx_dim else None
        self.attn = Attention(dim, ctx_dim or dim, heads, compete, rope)
        self.norm_mlp, self.mlp = RMSNorm(dim), SwiGLU(dim)

    def forward(self, x, ctx=None, mask=None):
        h = self.norm(x)
        x = x + self.attn(h, h if ctx is None else self.norm_ctx(ctx), mask)
        return x + self.mlp(self.norm_mlp(x))


class RINBlock(nn.Module):
    """Latents: attend to the conditioning, read the patches, think K times; then patches read them back.
    With patch_cond, the patches first attend to the conditioning too, so that each patch reads the
    caption itself instead of only what the latents pass on; with patch_bind they then also read it
    through an attention whose heads compete."""

    def __init__(self, data_dim, latent_dim, num_layers, heads, patch_cond=False, patch_bind=False):
        super().__init__()
        self.patch_cond = Block(data_dim, heads, ctx_dim=latent_dim) if patch_cond else None
        self.patch_bind = Block(data_dim, heads, ctx_dim=latent_dim, compete=True) if patch_bind else None
        self.attend_cond = Block(latent_dim, heads, ctx_dim=latent_dim)
        self.read = Block(latent_dim, heads, ctx_dim=data_dim)
        self.think = nn.ModuleList(Block(latent_dim, heads) for _ in range(num_layers))
        self.write = Block(data_dim, heads, ctx_dim=latent_dim)

    def forward(self, patches, latents, cond, cond_mask):
        if self.patch_cond is not None:
            patches = self.patch_cond(patches, cond, cond_mask)
        if self.patch_bind is not None:
            patches = self.patch_bind(patches, cond, cond_mask)
        latents = self.attend_cond(latents, cond, cond_mask)
        latents = self.read(latents, patches)
        for layer in self.think:
            latents = layer(latents)
        return self.write(patches, latents), latents


def sinusoid(values, dim):
    """(B,) values in [0, 1] -> (B, dim) sin/cos features, angular frequencies 1000 down to 0.1."""
    freqs = torch.exp(-math.log(1e4) * torch.arange(dim // 2, device=values.device) / (dim // 2))
    angles = 1000 * values.float()[:, None] * freqs  # x1000: t and levels live in [0, 1]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def skip_scales(t, sigma_data):
    """c_skip, c_out (B, 1, 1, 1) for v = eps - x from x_t = (1 - t) x + t eps, with E[x^2] = s^2:
    c_skip = Cov(v, x_t) / Var(x_t) = (t - (1 - t) s^2) / ((1 - t)^2 s^2 + t^2), and c_out^2 =
    Var(v) - c_skip Cov(v, x_t), what is left: s^2 at t = 1 (the image), 1 at t = 0 (the noise)."""
    t, s2 = t.float().view(-1, 1, 1, 1), sigma_data ** 2
    var_x_t, cov = (1 - t) ** 2 * s2 + t ** 2, t - (1 - t) * s2
    c_skip = cov / var_x_t
    return c_skip, (1 + s2 - c_skip * cov).clamp_min(1e-8).sqrt()


def velocity_from_image(x_t, x_hat, t):
    """v = (x_t - x_hat) / t: the velocity of the straight path from x_hat through x_t, the
    target eps - x exactly when x_hat = x (x_t = (1 - t) x + t eps); t clamped at T_MIN."""
    return (x_t - x_hat) / t.float().view(-1, 1, 1, 1).clamp_min(T_MIN)  # t in float32, as in skip_scales


def positions(n, dim):
    """(n, dim) fixed sin/cos codes of positions 0..n-1 (Vaswani et al.), values in [-1, 1]."""
    freqs = torch.exp(-math.log(1e4) * torch.arange(dim // 2) / (dim // 2))
    angles = torch.arange(n).float()[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def grid_positions(side, dim):
    """(side * side, dim) codes of a side x side grid: half the channels code the row, half the column."""
    rows, cols = positions(side, dim // 2), positions(side, dim - dim // 2)
    return torch.cat([rows[:, None].expand(-1, side, -1), cols[None].expand(side, -1, -1)], -1).reshape(side * side, dim)


def mlp(dim_in, hidden, dim_out):
    """Linear, SiLU, Linear."""
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.SiLU(), nn.Linear(hidden, dim_out))


def embedder(dim, freq_dim=256):
    """sinusoid features -> token."""
    return mlp(freq_dim, dim, dim)


# ----------------------------------------------------------------------------- text
_TOKENIZER = None


def tokenize(texts, length, text_encoder="own"):
    """Captions -> int64 (B, length) ids: CLIP BPE for the own encoder (open_clip's vocabulary ships
    with it, offline), else the frozen encoder's own tokenizer."""
    if text_encoder != "own":
        return frozen_text_encoder(text_encoder).tokenize(texts, length)
    global _TOKENIZER
    if _TOKENIZER is None:  # open_clip's tokenizer.py loaded on its own: `import open_clip` would also import
        # torchvision and timm, seconds in every stage, for a tokenizer that needs only ftfy and regex
        path = os.path.join(importlib.util.find_spec("open_clip").submodule_search_locations[0], "tokenizer.py")
        spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _TOKENIZER = module.SimpleTokenizer()
    return _TOKENIZER(list(texts), context_length=length)


class TextEncoder(nn.Module):
    """A small trainable transformer: ids (B, L) -> tokens (B, L, dim) and mask (B, L).

    conv > 0: before the transformer, each token also mixes with its neighbours (a residual 1-D
    convolution of that width over the words), so that "red circle" is a feature of the token
    "circle" from the start instead of something attention has to learn to bind."""

    def __init__(self, dim, layers, heads, length, conv=0, rope=False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, dim)
        self.pos = nn.Parameter(positions(length, dim))  # learned, from sin/cos codes as strong as the words
        self.conv = nn.Conv1d(dim, dim, conv, padding=conv // 2) if conv else None
        self.blocks = nn.ModuleList(Block(dim, heads, rope=rope) for _ in range(layers))
        self.norm = RMSNorm(dim)

    def forward(self, ids):
        mask = ids != PAD_ID                               # (B, L) real tokens (start, words, end)
        x = self.embed(ids) + self.pos[: ids.shape[1]]     # (B, L, dim)
        if self.conv is not None:  # padding is zeroed first: a caption's last words see nothing after them
            x = x + self.conv((x * mask[..., None]).transpose(1, 2)).transpose(1, 2)[:, : ids.shape[1]]
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.norm(x), mask


# ----------------------------------------------------------------------------- the network
class TextRIN(nn.Module):
    """v = net(x_t, t, reward levels, caption): the velocity of paper eq. 2, and the latents."""

    def __init__(self, image_size, patch_size, data_dim, latent_dim, num_latents, num_blocks, num_layers,
                 heads, text_dim, text_layers, text_len, num_rewards, sigma_data=0.5, text_encoder="own",
                 prediction="v", patch_cond=False, cell_codes="sincos", interface="learned", patch_bind=False,
                 text_conv=0, text_rope=False, self_cond="latents", pixel_skip=False):
        super().__init__()
        if self_cond not in ("latents", "image"):
            raise ValueError(f"self_cond must be 'latents' or 'image', not {self_cond!r}")
        if prediction not in ("v", "x"):
            raise ValueError(f"prediction must be 'v' or 'x', not {prediction!r}")
        if interface not in ("learned", "pca"):
            raise ValueError(f"interface must be 'learned' or 'pca', not {interface!r}")
        if interface == "pca" and data_dim > 3 * patch_size ** 2:
            raise ValueError(f"interface 'pca' needs data_dim <= a patch's {3 * patch_size ** 2} values, not {data_dim}")
        if cell_codes not in ("sincos", "random"):
            raise ValueError(f"cell_codes must be 'sincos' or 'random', not {cell_codes!r}")
        self.sigma_data, self.text_encoder, self.prediction, self.self_cond = sigma_data, text_encoder, prediction, self_cond
        self.image_size, self.patch_size, self.num_rewards, self.text_len = image_size, patch_size, num_rewards, text_len
        num_patches, patch_values = (image_size // patch_size) ** 2, 3 * patch_size ** 2
        # interface: patches in and out, linear (started from PCA with interface="pca", by fit_interface)
        self.patch_in = nn.Linear(patch_values, data_dim)
        # learned positions, started as strong as the normalised patches: with a small random start the
        # network cannot tell where a patch is for its first thousand or so steps. 2-D sin/cos codes of a
        # few positions are near copies of each other (their slow channels barely move); "random" codes
        # (unit normal per channel) are nearly orthogonal.
        side = image_size // patch_size
        if cell_codes == "random":
            codes = torch.randn(side * side, data_dim, generator=torch.Generator().manual_seed(0))
        else:
            codes = grid_positions(side, data_dim)
        self.patch_pos = nn.Parameter(codes)
        self.patch_norm = RMSNorm(data_dim)
        self.out_norm = RMSNorm(data_dim)
        self.patch_out = nn.Linear(data_dim, patch_values)
        if pixel_skip not in (False, True):
            raise ValueError(f"pixel_skip must be true or false, not {pixel_skip!r}")
        if pixel_skip and prediction != "x":
            raise ValueError("pixel_skip gates x_t into the clean-image estimate: it needs prediction='x'")
        # latents, and latent self-conditioning (zero-initialised: a no-op at the start)
        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim) * 0.02)
        self.prev_norm, self.prev_proj = RMSNorm(latent_dim), nn.Linear(latent_dim, latent_dim)
        if self_cond == "image":  # the previous clean-image estimate, patch by patch (zero-initialised below)
            self.prev_image_in = nn.Linear(patch_values, data_dim, bias=False)  # no bias: zeros are no estimate
        # conditioning tokens: time, one per reward (none for the baseline), text
        self.time_embed = embedder(latent_dim)
        if num_rewards:
            self.reward_embed = embedder(latent_dim)
            self.reward_id = nn.Parameter(torch.randn(num_rewards, latent_dim) * 0.5)  # which reward a token is
        if text_encoder == "own":  # trained with the denoiser
            self.text = TextEncoder(text_dim, text_layers, heads, text_len, text_conv, text_rope)
        else:  # frozen and pretrained (text_dim, text_layers unused): only the projection below is trained
            text_dim = frozen_text_encoder(text_encoder).width
        self.text_proj = nn.Linear(text_dim, latent_dim)
        self.blocks = nn.ModuleList(RINBlock(data_dim, latent_dim, num_layers, heads, patch_cond, patch_bind)
                                    for _ in range(num_blocks))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.zeros_(self.prev_proj.weight)
        if self_cond == "image":
            nn.init.zeros_(self.prev_image_in.weight)
        # pixel_skip (x-prediction): the estimate adds g times the grey of x_t's detail (x_t less its 3x3 mean,
        # averaged over the channels: grain is grey, clutter's specks are not), g a gate per patch read from its
        # token, so that a patch can keep the pixel grain x_t shows, which the smooth output of a 256-wide token
        # cannot draw. Made last and zero-initialised: the rest of the network starts as it would without it.
        self.pixel_skip = nn.Linear(data_dim, 1) if pixel_skip else None
        if pixel_skip:
            nn.init.zeros_(self.pixel_skip.weight), nn.init.zeros_(self.pixel_skip.bias)

    def patchify(self, x):
        """(B, 3, H, W) -> (B, P, 3 p p), patches in row-major order."""
        B, _, H, W = x.shape
        p = self.patch_size
        return x.reshape(B, 3, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, 3 * p * p)

    @torch.no_grad()
    def fit_interface(self, images):
        """Start the linear interface from the principal components of the training patches, images
        (N, 3, H, W) in [-1, 1]: patch_in projects a patch on the data_dim leading components, patch_out
        maps channels of unit variance back to patches (component k scaled by its std). With fewer
        patches than data_dim, the channels past their count keep their random start."""
        patches = self.patchify(images.float()).reshape(-1, self.patch_in.in_features)
        mean = patches.mean(0)
        _, S, V = torch.linalg.svd(patches - mean, full_matrices=False)
        k = min(self.patch_in.out_features, len(V))
        basis, std = V[:k], S[:k] / math.sqrt(max(1, len(patches) - 1))
        self.patch_in.weight[:k] = basis
        self.patch_in.bias.copy_(-self.patch_in.weight @ mean)
        self.patch_out.weight[:, :k] = (basis * std[:, None]).T
        self.patch_out.bias.copy_(mean)

    def encode_text(self, ids):
        """ids (B, L) -> text tokens (B, L, latent_dim), mask (B, L): all the denoiser sees of the caption."""
        if self.text_encoder == "own":
            tokens, mask = self.text(ids)                              # (B, L, text_dim)
        else:
            tokens, mask = frozen_states(self.text_encoder, ids)       # (B, L, width), no gradient
        return self.text_proj(tokens.to(self.text_proj.weight.dtype)), mask

    def condition(self, t, levels, text_tokens, text_mask):
        """The conditioning tokens (B, 1 + R + L, latent_dim) and their mask."""
        dtype = self.latents.dtype  # float32 features, in the parameters' dtype (float64 in the tests)
        tokens = [self.time_embed(sinusoid(t, 256).to(dtype))[:, None]]       # (B, 1, D)
        if self.num_rewards:
            B, R = levels.shape
            reward = self.reward_embed(sinusoid(levels.reshape(-1), 256).to(dtype)).view(B, R, -1)
            tokens.append(reward + self.reward_id)                            # (B, R, D)
        tokens.append(text_tokens)                                            # (B, L, D)
        always = torch.ones(t.shape[0], 1 + self.num_rewards, dtype=torch.bool, device=t.device)
        return torch.cat(tokens, dim=1), torch.cat([always, text_mask], dim=1)

    def estimate(self, x_t, v, t):
        """The clean-image estimate x_hat = x_t - t v behind a velocity (t clamped as velocity_from_image
        clamps it under x-prediction): x_t (B, 3, H, W), v like it, t (B,)."""
        t = t.float().view(-1, 1, 1, 1)
        return x_t - (t.clamp_min(T_MIN) if self.prediction == "x" else t) * v

    def denoise(self, x_t, t, levels, text_tokens, text_mask, prev_latents=None, prev_image=None):
        """x_t (B, 3, H, W) in [-1, 1] scale, t (B,), levels (B, R) -> v (B, 3, H, W), latents (B, n, D).
        prev_image (self_cond="image"): the previous pass's clean-image estimate (None: zeros)."""
        B, _, H, W = x_t.shape
        p = self.patch_size
        patches = self.patch_norm(self.patch_in(self.patchify(x_t))) + self.patch_pos       # (B, P, data_dim)
        if prev_image is not None:
            patches = patches + self.prev_image_in(self.patchify(prev_image.to(patches.dtype)))
        latents = self.latents.expand(B, -1, -1)                                 # (B, n, latent_dim)
        if prev_latents is None:  # no previous pass: zeros, as for the 10% of training without one
            prev_latents = torch.zeros_like(latents)
        latents = latents + self.prev_proj(self.prev_norm(prev_latents))
        cond, cond_mask = self.condition(t, levels, text_tokens, text_mask)
        for block in self.blocks:
            patches, latents = block(patches, latents, cond, cond_mask)
        out = self.patch_out(self.out_norm(patches))                            # (B, P, 3 p p)
        if self.pixel_skip is not None:  # + gate x the grey of x_t's detail
            detail = x_t - F.avg_pool2d(x_t, 3, 1, 1, count_include_pad=False)
            grain = self.patchify(detail.mean(1, keepdim=True).expand_as(x_t)).to(out.dtype)   # (B, P, 3 p p)
            out = out + self.pixel_skip(self.out_norm(patches)) * grain
        out = out.reshape(B, H // p, W // p, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, H, W)
        if self.prediction == "x":  # out is the clean image
            return velocity_from_image(x_t, out, t), latents
        c_skip, c_out = skip_scales(t, self.sigma_data)
        return c_skip * x_t + c_out * out, latents


    def forward(self, x_t, t, levels, text_ids, prev_latents=None, self_cond=None, prev_image=None):
        """With self_cond (B,) (training): a first pass without gradients makes a guess, and the
        returned pass sees its latents (or, self_cond="image", its clean-image estimate) where
        self_cond is 1 (zeros where 0, as at the first sampling step). Both passes share one
        encoding of the caption."""
        text_tokens, text_mask = self.encode_text(text_ids)
        if self_cond is not None:  # the first pass runs only for the images that see its guess
            on = self_cond > 0
            with torch.no_grad():
                v, guess = self.denoise(x_t[on], t[on], levels[on], text_tokens[on].detach(), text_mask[on])
            if self.self_cond == "image":
                prev_image = torch.zeros_like(x_t)
                prev_image[on] = (self.estimate(x_t[on], v, t[on]) * self_cond[on].view(-1, 1, 1, 1)).to(x_t.dtype)
            else:
                prev_latents = guess.new_zeros(len(x_t), *guess.shape[1:])
                prev_latents[on] = guess * self_cond[on].view(-1, 1, 1).to(guess.dtype)
        return self.denoise(x_t, t, levels, text_tokens, text_mask, prev_latents, prev_image)


def build(preset, num_rewards, **overrides):
    """A TextRIN from a preset name; returns (model, model_args) with model_args enough to rebuild it."""
    model_args = dict(PRESETS[preset], num_rewards=num_rewards, **overrides)
    return TextRIN(**model_args), model_args


def rebuild(model_args, weights, path, stage):
    """The TextRIN a checkpoint describes (model_args), with weights loaded; one line naming the
    file if it does not hold a network of this code (mistyped settings, missing or extra weights)."""
    try:
        model = TextRIN(**model_args)
        model.load_state_dict(weights)
    except (TypeError, ValueError, RuntimeError, AttributeError, KeyError) as e:
        reason = " ".join(str(e).split())[:160]
        sys.exit(f"{stage}: error: {path} does not hold a network this code can rebuild ({type(e).__name__}: "
                 f"{reason}): re-run 05_train.py")
    return model


# ============================================================================= frozen pretrained text encoders
# The real-model path (--text-encoder openclip:... or t5:...): the default own encoder never needs it.
class FrozenOpenCLIP:
    """The text tower of an open_clip CLIP. Token states: the per-token output of its final layer norm
    (CLIP's text embedding is the end token's state, projected)."""

    def __init__(self, name, pretrained):
        import open_clip  # lazy: the default path needs only its tokenizer
        if not pretrained:  # none named: open_clip's first listed weights for ARCH
            pretrained = (open_clip.list_pretrained_tags_by_model(name) or [None])[0]
        quick_gelu = open_clip.get_pretrained_cfg(name, pretrained or "").get("quick_gelu", False)  # OpenAI's
        logging.disable(logging.ERROR)  # open_clip logs a failed download before raising it: one line is ours
        try:
            model = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu)
        finally:
            logging.disable(logging.NOTSET)
        if getattr(model, "attn_mask", None) is None:  # a HF or bidirectional text tower
            sys.exit(f"{STAGE}: error: openclip:{name}: only CLIP models with open_clip's own causal text "
                     "transformer are supported (e.g. ViT-L-14, ViT-H-14, ViT-bigG-14)")
        del model.visual  # text only (ViT-H-14's image tower is 632M parameters)
        self.model, self.tokenizer, self.width = model, open_clip.get_tokenizer(name), model.transformer.width

    def tokenize(self, texts, length):
        if length > self.model.context_length:
            sys.exit(f"{STAGE}: error: text_len {length} is longer than CLIP's {self.model.context_length} positions")
        return self.tokenizer(list(texts), context_length=length)  # start, BPE ids, end, then zeros

    def __call__(self, ids):
        """ids (B, L) -> states (B, L, width), mask (B, L): True up to and including the end token."""
        model, L = self.model, ids.shape[1]
        x = model.token_embedding(ids) + model.positional_embedding[:L]
        # causal attention: no token sees the padding after it, so L < 77 positions give the same states
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:L, :L]))
        end = (ids == self.tokenizer.eot_token_id).int().argmax(1)  # (B,)
        return x, torch.arange(L, device=ids.device) <= end[:, None]


class FrozenT5:
    """A T5 encoder (transformers). Token states: the encoder's last hidden state."""

    def __init__(self, source):
        from transformers import AutoTokenizer, T5EncoderModel  # lazy: the default path never needs them
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model, info = T5EncoderModel.from_pretrained(source, output_loading_info=True)  # drops the decoder
        if info["missing_keys"]:  # strict: a missing weight would silently stay random
            raise RuntimeError(f"{source}: missing keys in the state_dict: {sorted(info['missing_keys'])[:3]}")
        self.width = self.model.config.d_model

    def tokenize(self, texts, length):  # words, </s>, then <pad>
        return self.tokenizer(list(texts), padding="max_length", max_length=length, truncation=True,
                              return_tensors="pt").input_ids

    def __call__(self, ids):
        mask = ids != self.tokenizer.pad_token_id  # (B, L) the tokenizer's attention mask
        return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state, mask


@functools.lru_cache(maxsize=None)
def frozen_text_encoder(spec):
    """'openclip:ARCH[:PRETRAINED_OR_PATH]', 'openclip:local-dir:FOLDER' or 't5:ID_OR_PATH' -> the encoder,
    loaded once per process and shared by every TextRIN that names it (a model and its EMA copy)."""
    kind, _, source = spec.partition(":")
    name, _, pretrained = source.partition(":")
    if name in ("local-dir", "hf-hub"):  # open_clip's folder (or hub repo) of config and weights
        name, pretrained = source, None
    try:
        if kind == "t5" and source:
            encoder = FrozenT5(source)
        elif kind == "openclip" and source:
            encoder = FrozenOpenCLIP(name, pretrained)
        else:
            sys.exit(f"{STAGE}: error: unknown text encoder {spec!r}: own, openclip:ARCH[:PRETRAINED_OR_PATH] "
                     "(e.g. openclip:ViT-H-14:laion2b_s32b_b79k) or t5:ID_OR_PATH (e.g. t5:google/flan-t5-xl)")
    except (OSError, ValueError, RuntimeError) as e:
        if "state_dict" in str(e):
            raise  # wrong keys in a checkpoint are a real error, not a missing download
        local = "t5:/path/to/folder" if kind == "t5" else (f"openclip:{'ARCH' if ':' in name else name}:/path/to/"
                                                         "open_clip_pytorch_model.bin (or openclip:local-dir:FOLDER)")
        reason = " ".join(str(e).split()).split(". ")[0][:160]  # its first sentence, on one line
        sys.exit(f"{STAGE}: error: cannot load text encoder {spec!r} ({type(e).__name__}: {reason}): "
                 f"download it where the hub is reachable, or pass a local path: --text-encoder {local}")
    encoder.model.eval().requires_grad_(False)  # frozen: no dropout, no gradients, never in an optimizer
    return encoder


@torch.compiler.disable  # eager, outside a compiled graph: it has no backward
@torch.no_grad()
def frozen_states(spec, ids):
    """ids (B, L) -> the frozen encoder's states (B, L, width) and mask (B, L), without autograd.
    Not a submodule of TextRIN (so in none of its parameters, state dict or .to()), the encoder moves to
    the ids' device here, bf16 on CUDA. A training step calls it once (TextRIN.forward encodes the
    caption once for both self-conditioning passes)."""
    encoder = frozen_text_encoder(spec)
    encoder.model.to(ids.device, torch.bfloat16 if ids.device.type == "cuda" else torch.float32)
    return encoder(ids)


# ============================================================================= the stage as a script
# python 04_model.py: each preset's size and FLOPs, and self-checks of a random network.
def dummy_inputs(model_args, batch, device="cpu"):
    """Random inputs of the right shapes: x_t, t, levels, text ids."""
    size, R = model_args["image_size"], model_args["num_rewards"]
    ids = tokenize(["a red circle at the top left and a blue square at the bottom right."] * batch,
                   model_args["text_len"], model_args.get("text_encoder", "own")).to(device)
    return (torch.randn(batch, 3, size, size, device=device), torch.rand(batch, device=device),
            torch.rand(batch, R, device=device), ids)


def count_flops(fn):
    """FLOPs of fn() as counted by torch.utils.flop_counter (matmuls, attention; forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def self_check(model, model_args):
    """A forward/backward pass reaches every parameter; each reward level changes the output."""
    x_t, t, levels, ids = dummy_inputs(model_args, 2)
    v, latents = model(x_t, t, levels, ids)
    v2, _ = model(x_t, t, levels, ids, prev_latents=latents.detach())
    (v.square().mean() + v2.square().mean()).backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert v.shape == x_t.shape and not no_grad, f"no gradient reaches {no_grad}"
    with torch.no_grad():
        for r in range(model_args["num_rewards"]):
            low, high = levels.clone(), levels.clone()
            low[:, r], high[:, r] = 0.0, 1.0
            assert not torch.allclose(model(x_t, t, low, ids)[0], model(x_t, t, high, ids)[0]), f"reward {r} is ignored"
    return f"fwd/bwd ok, {model_args['num_rewards']} reward levels each change v"



def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), action="append", help="preset(s) to report (default all)")
    parser.add_argument("--rewards", type=int, default=4, help="number of reward tokens R")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{'preset':>6} {'params':>9} {'text enc':>9} {'res':>4} {'tokens P+n+c':>13} "
          f"{'fwd GFLOP/img':>14} {'sample 50x2 GFLOP':>18}  checks")
    for preset in args.preset or list(PRESETS):
        model, model_args = build(preset, args.rewards)
        params = sum(p.numel() for p in model.parameters())
        text_params = sum(p.numel() for p in model.text.parameters())
        x_t, t, levels, ids = dummy_inputs(model_args, 1)
        text_flops = count_flops(lambda: model.encode_text(ids))
        text_tokens, text_mask = model.encode_text(ids)
        denoise_flops = count_flops(lambda: model.denoise(x_t, t, levels, text_tokens, text_mask))
        # sampling: the caption is encoded once; 50 steps x 2 branches (s+ and s-) of the denoiser
        sample_flops = text_flops + 50 * 2 * denoise_flops
        checks = self_check(model, model_args)
        num_tokens = (model_args["image_size"] // model_args["patch_size"]) ** 2
        tokens = f"{num_tokens}+{model_args['num_latents']}+{1 + args.rewards + model_args['text_len']}"
        print(f"{preset:>6} {params / 1e6:8.1f}M {text_params / 1e6:8.1f}M {model_args['image_size']:>4} {tokens:>13} "
              f"{(text_flops + denoise_flops) / 1e9:14.2f} {sample_flops / 1e9:18.1f}  {checks}")


if __name__ == "__main__":
    main()
