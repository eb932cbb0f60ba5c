"""A small Sora-style diffusion transformer over spacetime patches of video (one file, nanoGPT-style).

    model = SpacetimeDiT(SoraConfig(**PRESETS["tiny"]))       # or pz.load("sora-tiny") for the shipped one
    eps = model(x_t, t, y)                                     # [B, C, T, H, W] noise prediction
    videos = model.sample([3, 7], steps=50, seed=0)            # [2, 1, T, 32, 32] in [0, 1]
    fast = FastSampler(model, batch=2, mode="compile")         # or "graph" on CUDA: built once, same videos

A video ``[B, C, T, H, W]`` is cut into spacetime patches (``pt x ph x pw``) by a strided Conv3d, giving
tokens ``[B, T', S, D]`` (``S = H' * W'`` spatial positions per frame). Each `DiTBlock` runs spatial
attention (the tokens of one frame), temporal attention (one position across frames) and an MLP, each
modulated by adaLN-Zero from ``c = t_embed(t) + y_embed(y)``: the class label id ``num_classes`` is the
null label used for classifier-free guidance. Diffusion: a 1,000-step noise schedule (cosine for the
presets, linear DDPM betas available), epsilon prediction (Min-SNR weighted in training), and a
deterministic DDIM sampler with guidance (`sora_sampler`: the same step compiled or as a CUDA graph).
Videos live in ``[-1, 1]`` inside the model. ``t`` may also give a step per temporal token ``[B, T']``
(diffusion forcing: trained with ``frame_steps``, sampled frame after frame with ``frame_lag``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ParticlizeError
from ._util import _recipe
from .sora_sampler import (GUIDANCE, MODES, FastSampler, ddim_plan, frame_noise, guidance_of, guided_ddim_step,
                           initial_noise, step_ids)

__all__ = ["PRESETS", "SoraConfig", "SpacetimeDiT", "DiTBlock", "Attention", "Diffusion", "FastSampler", "GUIDANCE",
           "inflate_time", "sora"]


@dataclass
class SoraConfig:
    in_channels: int = 1
    frames: int = 8
    size: int = 32
    patch: tuple[int, int, int] = (1, 4, 4)  # (pt, ph, pw)
    dim: int = 96
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    class_dropout: float = 0.1  # label dropout during training (classifier-free guidance)
    schedule: str = "linear"  # noise schedule: "linear" (DDPM) or "cosine" (improved DDPM)
    shift: float = 1.0  # noise shift: every step's signal-to-noise ratio divided by shift**2 (1: none)
    temporal: str = "position"  # the second attention: "position" (across frames, one spatial position) or "all"
    frame_corr: float = 0.0  # correlation of the noise across frames (training and sampling; 0: independent)
    frame_steps: float = 0.0  # share of training videos whose frames each get their own step (diffusion forcing)
    frame_lag: int = 0  # sampler: each temporal token starts this many DDIM steps after the one before (0: together)
    rope: bool = False  # rotary frame positions in the temporal attention (relative time, which motion needs)
    guidance: float = GUIDANCE  # the sampler's default classifier-free guidance scale (1: none)

    def __post_init__(self) -> None:
        self.patch = tuple(int(p) for p in self.patch)  # JSON gives lists
        pt, ph, pw = self.patch
        if self.frames % pt or self.size % ph or self.size % pw:
            raise ValueError(f"patch {self.patch} does not tile {self.frames} frames of {self.size}x{self.size}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if not 0 <= self.frame_corr < 1:
            raise ValueError(f"frame_corr must be in [0, 1), got {self.frame_corr}")
        if not 0 <= self.frame_steps <= 1:
            raise ValueError(f"frame_steps is a share of training videos in [0, 1], got {self.frame_steps}")
        if self.frame_lag < 0:
            raise ValueError(f"frame_lag counts sampler steps: 0 or more, got {self.frame_lag}")
        if not self.shift > 0:
            raise ValueError(f"noise shift must be positive, got {self.shift}")
        if not self.guidance >= 1:
            raise ValueError(f"guidance scales the conditional direction: 1 (none) or more, got {self.guidance}")
        if self.temporal not in TEMPORAL:
            raise ValueError(f"unknown temporal attention {self.temporal!r}; choose one of {', '.join(TEMPORAL)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")


SCHEDULES = ("linear", "cosine")
TEMPORAL = ("position", "all")

PRESETS: dict[str, dict] = {
    "tiny": dict(frames=8, size=32, patch=(2, 4, 4), dim=64, depth=4, heads=4, mlp_ratio=4.0,
                 schedule="cosine"),  # CPU
    "base": dict(frames=8, size=32, patch=(1, 4, 4), dim=128, depth=6, heads=4, mlp_ratio=4.0,
                 schedule="cosine"),  # minutes on a GPU, samples on a CPU: one token per frame, so digits can move smoothly
    "small": dict(frames=16, size=32, patch=(1, 4, 4), dim=256, depth=8, heads=8, mlp_ratio=4.0,
                  schedule="cosine"),  # GPU
}


def per_token(m: Tensor) -> Tensor:
    """A condition-derived vector ``[B, D]`` (one per video) or ``[B, T', D]`` (one per frame) made to broadcast
    over tokens ``[B, T', S, D]``."""
    return m[:, None, None, :] if m.ndim == 2 else m[:, :, None, :]


def per_frame(v: Tensor, frames: int) -> Tensor:
    """Values per temporal token ``[B, T']`` repeated over the frames each token covers: ``[B, frames]``."""
    return v.repeat_interleave(frames // v.shape[1], 1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    # x [B, T, S, D]; shift, scale [B, D] or [B, T, D]; one pass over x (addcmul), not two
    return torch.addcmul(per_token(shift), x, 1 + per_token(scale))


def gated(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """The residual update ``x + gate * y`` (adaLN-Zero's gate per video or per frame) in one pass."""
    return torch.addcmul(x, per_token(gate), y)


ROPE_BASE = 100.0  # rotary wavelengths from 2*pi to ~2*pi*100 frames: a clip is a handful of frames long


def rotary(positions: Tensor, head_dim: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """The factors ``(cos, sin) [L, head_dim]`` that `rotate` turns vectors by at ``positions [L]``, in ``like``'s
    dtype and device: each cosine twice (both halves), the sines negated on the first half (rotate-half's
    ``-b``), and 1 / 0 on an odd trailing dimension. Computed once, shared by a layer's queries and keys."""
    half = head_dim // 2
    freqs = ROPE_BASE ** (-torch.arange(half, device=like.device, dtype=torch.float32) / half)
    angle = positions.to(like.device, torch.float32)[:, None] * freqs  # [L, half]
    cos, sin = angle.cos(), angle.sin()
    rest = angle.new_ones(angle.shape[0], head_dim - 2 * half)
    cos, sin = torch.cat([cos, cos, rest], -1), torch.cat([-sin, sin, torch.zeros_like(rest)], -1)
    return cos.to(like.dtype), sin.to(like.dtype)


def rotate(t: Tensor, positions: Tensor, table: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Rotary position embedding (RoFormer, rotate-half layout) of ``t [..., L, hd]`` at ``positions [L]``
    (``table``: their `rotary` factors, if already computed): the dot product of a rotated query and key depends
    on their positions only through the difference. Pairs ``(a, b)`` = dims ``(i, i + hd // 2)`` turn to
    ``(a cos - b sin, b cos + a sin)``, computed as ``t * cos + swap(t) * sin`` in three passes over ``t``."""
    cos, sin = table if table is not None else rotary(positions, t.shape[-1], t)
    half = t.shape[-1] // 2
    swapped = torch.cat([t[..., half:2 * half], t[..., :half], t[..., 2 * half:]], dim=-1)  # (b, a, rest)
    return torch.addcmul(t * cos, swapped, sin)


class Attention(nn.Module):
    """Multi-head self-attention over dim -2 of ``x [B, N, L, D]`` (N independent sequences of L tokens).

    q, k, v and proj are separate Linears and the head count is read from ``q.out_features`` at run
    time, so removing heads (q/k/v rows, proj columns) needs no other change. The batch stays first up
    to ``proj``, whose input ``[B, N, L, heads * head_dim]`` is where head gates act. ``positions [L]``, when
    given, rotate each head's queries and keys (`rotate`).
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        B, N, L, _ = x.shape
        h, hd = self.q.out_features // self.head_dim, self.head_dim

        def split(t: Tensor) -> Tensor:  # [B, N, L, h*hd] -> [B*N, h, L, hd]
            return t.reshape(B * N, L, h, hd).transpose(1, 2)

        q, k = split(self.q(x)), split(self.k(x))
        if positions is not None:
            table = rotary(positions, hd, q)
            q, k = rotate(q, positions, table), rotate(k, positions, table)
        y = F.scaled_dot_product_attention(q, k, split(self.v(x)))
        y = y.transpose(1, 2).reshape(B, N, L, h * hd)  # heads side by side, batch first again
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Spatial attention, temporal attention and MLP, each adaLN-Zero modulated by the condition ``c``.

    ``temporal="position"`` attends across frames at one spatial position (factorized, as Latte and Open-Sora
    1.x); ``"all"`` across every position of every frame (full spacetime attention, as Sora's patches suggest),
    so a token can find its digit where it moved to. ``rope`` rotates the temporal attention's queries and keys
    by frame index (`rotate`), so every block sees how many frames apart two tokens are.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, temporal: str = "position", rope: bool = False):
        super().__init__()
        self.temporal, self.rope = temporal, rope
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn_s = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn_t = Attention(dim, heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        # 9 modulation vectors: (shift, scale, gate) for each of the three sub-layers
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 9 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        # x [B, T, S, D]; c [B, D] or, with a step per frame, [B, T, D]
        mods = self.adaLN(c).chunk(9, dim=-1)
        sh1, sc1, g1, sh2, sc2, g2, sh3, sc3, g3 = mods
        x = gated(x, g1, self.attn_s(modulate(self.norm1(x), sh1, sc1)))  # within a frame
        xt = modulate(self.norm2(x), sh2, sc2)
        B, T, S, D = x.shape
        frame = torch.arange(T, device=x.device) if self.rope else None
        if self.temporal == "all":  # [B, 1, T*S, D]: every token of the video
            pos = frame.repeat_interleave(S) if frame is not None else None
            x = gated(x, g2, self.attn_t(xt.reshape(B, 1, T * S, D), pos).reshape(B, T, S, D))
        else:  # [B, S, T, D]: across frames, laid out once (not once for each of q, k and v)
            x = gated(x, g2, self.attn_t(xt.transpose(1, 2).contiguous(), frame).transpose(1, 2))
        x = gated(x, g3, self.mlp(modulate(self.norm3(x), sh3, sc3)))
        return x


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the diffusion step, then an MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[..., None] * freqs
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # in fp32, then in the model's dtype
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class Diffusion:
    """The 1,000-step noise schedule shared by training and the DDIM sampler: ``"linear"`` betas
    1e-4..0.02 (DDPM) or ``"cosine"`` (improved DDPM: more steps at the noise levels that shape a
    sample, which small models on small frames learn much sooner). ``shift`` > 1 divides every step's
    signal-to-noise ratio by ``shift**2`` (the resolution shift of simple diffusion / SD3 / Open-Sora): eight
    frames of the same digit keep its place readable at noise that hides a single frame, so the steps
    that decide where the digit is and how it moves need more noise than a single image does."""

    def __init__(self, steps: int = 1000, schedule: str = "linear", shift: float = 1.0):
        self.steps = steps
        if schedule == "linear":
            betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
            self.alpha_bar = torch.cumprod(1 - betas, 0).float()  # [steps]
        elif schedule == "cosine":
            s = 0.008
            f = torch.cos((torch.arange(steps + 1, dtype=torch.float64) / steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
            self.alpha_bar = torch.cumprod(1 - betas, 0).float()
        else:
            raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if shift != 1.0:
            snr = self.alpha_bar.double() / (1 - self.alpha_bar.double()) / shift**2
            self.alpha_bar = (snr / (1 + snr)).float()
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}  # alpha_bar per device (`on`)

    def on(self, device: torch.device) -> Tensor:
        """``alpha_bar`` on ``device``, copied there once (not a host-to-device copy every training step)."""
        if device not in self._on or self._on[device][0] is not self.alpha_bar:  # (re)copied if alpha_bar was replaced
            self._on[device] = (self.alpha_bar, self.alpha_bar.to(device))
        return self._on[device][1]

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)`` at steps ``t``."""
        a = self.on(t.device)[t]
        return a / (1 - a)

    def loss_weight(self, t: Tensor, min_snr_gamma: float | None) -> Tensor:
        """Min-SNR-gamma weights for epsilon prediction (``min(snr, gamma) / snr``; 1 when ``None``):
        easy low-noise steps stop dominating the loss, so training converges several times sooner."""
        if min_snr_gamma is None:
            return torch.ones(t.shape, device=t.device)
        snr = self.snr(t)
        return snr.clamp(max=min_snr_gamma) / snr

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t`` for clean videos ``x0 [B, C, T, ...]`` at steps ``t [B]``, or ``[B, T']`` (a step per temporal
        token, each covering ``T / T'`` frames)."""
        a = self.alpha_bar_like(x0, t)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def alpha_bar_like(self, x: Tensor, t: Tensor) -> Tensor:
        """``alpha_bar`` at steps ``t`` (``[B]`` or ``[B, T']``) shaped to broadcast over videos ``x [B, C, T, ...]``."""
        a = self.on(x.device)[t]
        if t.ndim == 1:
            return a.view(-1, *[1] * (x.ndim - 1))
        return per_frame(a, x.shape[2]).view(a.shape[0], 1, x.shape[2], *[1] * (x.ndim - 3))


class SpacetimeDiT(nn.Module):
    """Diffusion transformer predicting the noise in a video ``[B, C, T, H, W]`` at step ``t`` for label ``y``."""

    def __init__(self, config: SoraConfig | None = None, **kwargs):
        super().__init__()
        config = config if config is not None else SoraConfig(**kwargs)
        self.config = config
        self.particlize_recipe = _recipe(SpacetimeDiT, **asdict(config))
        D, (pt, ph, pw) = config.dim, config.patch
        self.grid = (config.frames // pt, config.size // ph, config.size // pw)  # (T', H', W')
        T_, H_, W_ = self.grid
        self.patch_embed = nn.Conv3d(config.in_channels, D, kernel_size=config.patch, stride=config.patch)
        self.pos_spatial = nn.Parameter(torch.randn(1, 1, H_ * W_, D) * 0.02)
        self.pos_temporal = nn.Parameter(torch.randn(1, T_, 1, D) * 0.02)
        self.t_embed = TimestepEmbedder(D)
        self.y_embed = nn.Embedding(config.num_classes + 1, D)  # last id = null label
        self.blocks = nn.ModuleList(DiTBlock(D, config.heads, config.mlp_ratio, config.temporal, config.rope)
                                    for _ in range(config.depth))
        self.final = FinalLayer(D, pt * ph * pw * config.in_channels)
        self.diffusion = Diffusion(schedule=config.schedule, shift=config.shift)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for m in self.t_embed.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN[-1].weight)
            nn.init.zeros_(blk.adaLN[-1].bias)
        for m in (self.final.adaLN[-1], self.final.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        # x [B, C, T, H, W]; t [B] (0..999) or [B, T'] (a step per temporal token); y [B] (num_classes = null label)
        B = x.shape[0]
        T_, H_, W_ = self.grid
        out_dtype = x.dtype  # a bf16 / fp16 model takes and returns the sampler's fp32 videos
        h = self.patch_embed(x.to(self.patch_embed.weight.dtype))  # [B, D, T', H', W']
        h = h.flatten(3).permute(0, 2, 3, 1)  # [B, T', S, D]
        h = h + self.pos_spatial + self.pos_temporal
        c = self.t_embed(t) + (self.y_embed(y) if t.ndim == 1 else self.y_embed(y)[:, None])  # [B, D] or [B, T', D]
        for block in self.blocks:
            h = block(h, c)
        h = self.final(h, c)  # [B, T', S, pt*ph*pw*C]
        pt, ph, pw = self.config.patch
        C = self.config.in_channels
        h = h.reshape(B, T_, H_, W_, pt, ph, pw, C)
        h = h.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, T', pt, H', ph, W', pw]
        return h.reshape(B, C, T_ * pt, H_ * ph, W_ * pw).to(out_dtype)

    def loss(
        self, x0: Tensor, y: Tensor, generator: torch.Generator | None = None, min_snr_gamma: float | None = None
    ) -> Tensor:
        """Epsilon-prediction MSE at uniformly drawn steps (``x0`` in [-1, 1]); ``min_snr_gamma`` weights
        the steps as in training (`Diffusion.loss_weight`)."""
        t = torch.randint(0, self.diffusion.steps, (x0.shape[0],), generator=generator).to(x0.device)
        noise = frame_noise(x0.shape, generator, self.config.frame_corr).to(x0.device)
        return self.weighted_mse(self(self.diffusion.add_noise(x0, t, noise), t, y), noise, t, min_snr_gamma)

    def weighted_mse(self, pred: Tensor, noise: Tensor, t: Tensor, min_snr_gamma: float | None = None) -> Tensor:
        """Mean over the batch of per-video MSE times the step's min-SNR weight (per frame when ``t`` is
        ``[B, T']``: each frame's MSE times its own step's weight)."""
        if t.ndim == 1:
            per_video = (pred - noise).pow(2).flatten(1).mean(1)
            return (per_video * self.diffusion.loss_weight(t, min_snr_gamma)).mean()
        frame_mse = (pred - noise).pow(2).transpose(1, 2).flatten(2).mean(2)  # [B, T]
        return (frame_mse * per_frame(self.diffusion.loss_weight(t, min_snr_gamma), pred.shape[2])).mean()

    def plan(self, steps: int, device: torch.device | None = None) -> list:
        """The sampler's iterations ``(t, a, a_prev)`` for ``steps`` DDIM steps (`ddim_plan`, staggered by
        ``config.frame_lag``)."""
        ab = self.diffusion.alpha_bar.to(device if device is not None else self.pos_spatial.device)
        return ddim_plan(ab, steps, self.grid[0], self.config.patch[0], self.config.frame_lag)

    @torch.no_grad()
    def sample(
        self,
        labels: Sequence[int] | Tensor,
        steps: int = 50,
        seed: int = 0,
        guidance: float | None = None,
        trajectory: list[tuple[Tensor, int | Tensor]] | None = None,
        mode: str = "eager",
    ) -> Tensor:
        """Deterministic DDIM (eta = 0) with classifier-free guidance: videos ``[B, C, T, H, W]`` in [0, 1].

        ``labels`` are class ids (``num_classes`` = unconditional); ``guidance`` 1.0 turns guidance off; None
        (the default) takes the model's own ``config.guidance`` (5 unless its training says otherwise: the shipped
        ``sora-tiny`` draws its digits best at 5, ``sora-digits`` at 3; benchmarks/RESULTS.md).
        The starting noise is drawn on the CPU from ``seed``, so results do not depend on the device.
        A model with ``config.frame_lag`` > 0 draws its frames staggered (`ddim_plan`: each frame's steps start
        ``frame_lag`` iterations after the previous frame's, as diffusion forcing samples).
        A ``trajectory`` list receives ``(x_t, t)`` for every step (``t`` a ``[T']`` tensor when staggered):
        the noisy videos the sampler visits
        (what guidance-aware distillation trains on, `particlize.train_sora.distill_dit`).
        ``mode`` ``"graph"`` (CUDA graphs) or ``"compile"`` (``torch.compile``) runs each step as one unit
        and gives the same videos (`FastSampler`; build one yourself to reuse it across calls).
        """
        if mode not in MODES:
            raise ParticlizeError(f"unknown sampling mode {mode!r}: choose one of {', '.join(MODES)}")
        y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        guidance = guidance_of(self, guidance)
        if mode != "eager":
            return FastSampler(self, y.shape[0], mode, guidance)(y, steps=steps, seed=seed, trajectory=trajectory)
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            y = y.to(device)
            B, cfg = y.shape[0], self.config
            x = initial_noise((B, cfg.in_channels, cfg.frames, cfg.size, cfg.size), seed, device, cfg.frame_corr)
            null = torch.full_like(y, self.null_label)
            for t, a, a_prev in self.plan(steps, device):
                if trajectory is not None:
                    trajectory.append((x.clone(), t))
                x = guided_ddim_step(self, x, step_ids(t, B, device), y, null, a, a_prev, guidance)
            return ((x + 1) / 2).clamp(0, 1)
        finally:
            self.train(was_training)

def sora(preset: str = "tiny", **overrides) -> SpacetimeDiT:
    """A randomly initialised `SpacetimeDiT` from a preset (``"tiny"`` for CPU; ``"base"``, the moving-digits
    task's 8 frames with 1-frame temporal patches, and ``"small"``, 16 frames, for GPU training)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return SpacetimeDiT(SoraConfig(**{**PRESETS[preset], **overrides}))


def inflate_time(model: SpacetimeDiT, pt: int = 1) -> SpacetimeDiT:
    """A copy of ``model`` with temporal patch ``pt`` (a divisor of its own), e.g. one token per frame
    from a model that packs two frames into a token, so a coarse model can start a finer one.

    The patch embedding sums its temporal taps in groups, the output layer averages its per-frame
    outputs over a group, and each temporal position embedding is repeated. On a video whose frames
    repeat in runs of the old patch length the copy predicts, per frame, the old model's output
    averaged over the run: attention over repeated keys and values weighs them exactly as before.
    """
    old = model.config
    k = old.patch[0] // pt if pt > 0 and old.patch[0] % pt == 0 else 0
    if not k:
        raise ValueError(f"temporal patch {pt} does not divide the model's {old.patch[0]}: choose a divisor")
    if old.rope:
        raise ValueError("rotary positions count temporal tokens, which inflating changes: inflate the model before "
                         "turning rope on")
    cfg = SoraConfig(**{**asdict(old), "patch": (pt, *old.patch[1:])})
    new = SpacetimeDiT(cfg).to(next(model.parameters()).device)
    state = {n: v.clone() for n, v in model.state_dict().items()}
    D, C, _, ph, pw = state["patch_embed.weight"].shape
    state["patch_embed.weight"] = state["patch_embed.weight"].reshape(D, C, -1, k, ph, pw).sum(3)
    state["pos_temporal"] = state["pos_temporal"].repeat_interleave(k, dim=1)
    w, b = state["final.linear.weight"], state["final.linear.bias"]  # rows ordered (pt, ph, pw, C)
    state["final.linear.weight"] = w.reshape(-1, k, ph * pw * C, w.shape[-1]).mean(1).reshape(-1, w.shape[-1])
    state["final.linear.bias"] = b.reshape(-1, k, ph * pw * C).mean(1).reshape(-1)
    new.load_state_dict(state)
    return new
