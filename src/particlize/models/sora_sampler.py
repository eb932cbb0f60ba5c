"""Fast sampling for the spacetime DiT: one guided DDIM step replayed as a CUDA graph or compiled.

    sampler = FastSampler(model, batch=20, mode="graph")    # built once (capture / compile), then reused
    videos = sampler(labels, steps=50, seed=0)              # equals model.sample(labels, steps=50, seed=0)

``SpacetimeDiT.sample`` runs the deterministic DDIM loop eagerly: every step launches the denoiser's
kernels one by one from Python, which on a GPU costs more than the small model's arithmetic. A sampler
holds the whole step — the denoiser on the doubled batch (conditional and null labels), the guidance
combination and the DDIM update — as one unit:

- ``"graph"`` captures it in a ``torch.cuda.CUDAGraph`` over static buffers (the video, the step ids, the
  two ``alpha_bar`` values) and replays it per step (CUDA only);
- ``"compile"`` wraps it in ``torch.compile`` (CPU with a C++ compiler, or CUDA with Triton);
- ``"eager"`` runs it as written (the reference the other modes are checked against).

Every mode draws the starting noise the same way (on the CPU from ``seed``) and does the same arithmetic
(`guided_ddim_step`), so the same seed gives the same videos within float tolerance. A sampler reads the
model's parameters where they live when it is built: build a new one after moving or pruning the model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import ParticlizeError

__all__ = ["GUIDANCE", "MODES", "FastSampler", "ddim_plan", "ddim_timesteps", "frame_noise", "guidance_of",
           "guided_ddim_step", "initial_noise"]

GUIDANCE = 5.0  # the sampler's default classifier-free guidance scale
MODES = ("eager", "graph", "compile")


def guidance_of(model: nn.Module, guidance: float | None = None) -> float:
    """The classifier-free guidance scale to sample ``model`` with: ``guidance`` if given, else the model's own
    ``config.guidance`` (what it was tuned to sample at), else `GUIDANCE`."""
    return float(getattr(getattr(model, "config", None), "guidance", GUIDANCE) if guidance is None else guidance)


def ddim_timesteps(total: int, steps: int) -> list[int]:
    """The ``steps`` diffusion steps the sampler visits, from ``total - 1`` down to 0 (evenly spaced, rounded)."""
    if steps < 1:
        raise ParticlizeError(f"steps={steps}: the sampler needs at least one step")
    return torch.linspace(total - 1, 0, steps).round().long().tolist()


Plan = list[tuple["int | Tensor", Tensor, Tensor]]


def ddim_plan(alpha_bar: Tensor, steps: int, tokens: int = 1, pt: int = 1, lag: int = 0) -> Plan:
    """The sampler's iterations as ``(t, a, a_prev)``: the step(s) the denoiser is told, and ``alpha_bar`` now and
    after the update (1 after the last step).

    ``lag`` 0: ``steps`` iterations, ``t`` an int and ``a``, ``a_prev`` 0-dim (every frame at the same step).
    ``lag`` > 0 (for a model trained with a step per frame, ``frame_steps``): temporal token ``k`` of ``tokens``
    starts ``k * lag`` iterations after the first, so each frame is drawn while the frames before it are already
    clearer (the staggered schedule of diffusion forcing); ``steps + (tokens - 1) * lag`` iterations, ``t`` a
    long tensor ``[tokens]`` and ``a``, ``a_prev`` ``[1, 1, tokens * pt, 1, 1]`` (per frame). A token that has
    not started waits at the first step and one that has finished at step 0 clean, both with ``a_prev = a``
    (the DDIM update leaves them as they are)."""
    ts = ddim_timesteps(len(alpha_bar), steps)
    one = torch.ones((), device=alpha_bar.device)
    if lag == 0:
        return [(t, alpha_bar[t], alpha_bar[ts[i + 1]] if i + 1 < len(ts) else one) for i, t in enumerate(ts)]
    dev = alpha_bar.device
    level = torch.arange(steps + (tokens - 1) * lag, device=dev)[:, None] - lag * torch.arange(tokens, device=dev)
    # level < 0: waiting at the first step; level >= steps: finished, at step 0; else at ts[level]
    t = torch.tensor([*ts, 0], device=dev)[level.clamp(0, steps)]  # [iterations, tokens]
    a = alpha_bar[t]
    after = torch.cat([alpha_bar[ts[1:]], one[None]])  # alpha_bar after the update from each level
    a_prev = torch.where((level >= 0) & (level < steps), after[level.clamp(0, steps - 1)], a)
    frames = (1, 1, tokens * pt, 1, 1)
    return [(t[i], a[i].repeat_interleave(pt).view(frames), a_prev[i].repeat_interleave(pt).view(frames))
            for i in range(len(t))]


def step_ids(t: "int | Tensor", batch: int, device: torch.device) -> Tensor:
    """The denoiser's step input for one plan iteration: ``[batch]`` or ``[batch, tokens]``."""
    if isinstance(t, int):
        return torch.full((batch,), t, device=device, dtype=torch.long)
    return t.to(device).expand(batch, -1)


def frame_noise(shape: Sequence[int], generator: torch.Generator | None = None, frame_corr: float = 0.0) -> Tensor:
    """Standard normal noise ``[B, C, T, H, W]`` whose frames correlate by ``frame_corr`` (the mixed noise prior of
    PYoCo: one draw shared by all frames plus one per frame; 0 gives independent frames and draws only once)."""
    noise = torch.randn(tuple(shape), generator=generator)
    if frame_corr:
        B, C, _, H, W = shape
        shared = torch.randn((B, C, 1, H, W), generator=generator)
        noise = (1 - frame_corr) ** 0.5 * noise + frame_corr ** 0.5 * shared
    return noise


def initial_noise(shape: Sequence[int], seed: int, device: torch.device, frame_corr: float = 0.0) -> Tensor:
    """The starting noise: drawn on the CPU from ``seed`` (results do not depend on the device), then moved."""
    return frame_noise(shape, torch.Generator().manual_seed(seed), frame_corr).to(device)


def guided_ddim_step(
    model: nn.Module, x: Tensor, t: Tensor, y: Tensor, null: Tensor, a: Tensor, a_prev: Tensor, guidance: float
) -> Tensor:
    """One deterministic DDIM step (eta = 0) with classifier-free guidance: ``x_t`` -> ``x_{t_prev}``.

    ``x [B, C, T, H, W]``; ``t``, ``y``, ``null`` ``[B]`` (step ids, labels, null labels); ``a``, ``a_prev``:
    0-dim ``alpha_bar`` at this step and the next (1 after the last). ``guidance`` 1.0 runs the denoiser on
    the labels alone; otherwise on the doubled batch ``[x; x]`` with ``[y; null]``. The predicted clean video
    is clipped to [-1, 1] and the noise re-derived from it before the update.
    """
    if guidance == 1.0:
        eps = model(x, t, y)
    else:
        e = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        eps_c, eps_u = e.chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
    x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
    eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # consistent with the clipped x0
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def _check_compile(device: torch.device) -> None:
    """Say clearly, before a long first call, when ``torch.compile`` cannot build code on ``device``."""
    if not hasattr(torch, "compile"):
        raise ParticlizeError(f"mode='compile' needs torch.compile (torch {torch.__version__} has none): "
                              "use mode='eager'")
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise ParticlizeError("mode='compile' on CUDA needs Triton (not importable here): install it or "
                                  "use mode='graph'")
    elif device.type == "cpu":
        cxx = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
        if not any(c and shutil.which(c) for c in cxx):
            raise ParticlizeError("mode='compile' on a CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX) for "
                                  "torch.compile's inductor backend: install one or use mode='eager'")
    else:
        raise ParticlizeError(f"mode='compile' supports CPU and CUDA models, not {device.type}: use mode='eager'")


class FastSampler:
    """Guided DDIM sampling of a `SpacetimeDiT` for a fixed batch size, built once and called many times.

    ``mode`` is one of `MODES`; ``batch`` the number of videos per call (the static buffers' size);
    ``guidance`` the classifier-free guidance scale (fixed: it is part of the captured / compiled step; default:
    the model's ``config.guidance``, else `GUIDANCE`).
    Construction validates the mode; ``"graph"`` captures its CUDA graph here (a few warm-up steps first),
    ``"compile"`` compiles on the first call. The model is put in eval mode while sampling.
    """

    def __init__(self, model: nn.Module, batch: int, mode: str = "graph", guidance: float | None = None):
        if mode not in MODES:
            raise ParticlizeError(f"unknown sampling mode {mode!r}: choose one of {', '.join(MODES)}")
        if batch < 1:
            raise ParticlizeError(f"batch={batch}: a sampler needs at least one video per call")
        self.model, self.batch, self.mode, self.guidance = model, int(batch), mode, guidance_of(model, guidance)
        self.device = next(model.parameters()).device
        cfg = model.config
        self.shape = (self.batch, cfg.in_channels, cfg.frames, cfg.size, cfg.size)
        self.frame_corr = getattr(cfg, "frame_corr", 0.0)
        self.tokens = model.grid[0] if getattr(cfg, "frame_lag", 0) else 0  # a step per temporal token
        self.null_label = model.null_label
        self._graph: torch.cuda.CUDAGraph | None = None
        self._compiled_ok = False
        step: Callable[..., Tensor] = self._step
        if mode == "graph":
            if self.device.type != "cuda":
                raise ParticlizeError(f"mode='graph' replays CUDA graphs: the model is on {self.device.type}; move it "
                                      "to a CUDA device or use mode='compile' or 'eager'")
            self._capture()
        elif mode == "compile":
            _check_compile(self.device)
            step = torch.compile(self._step, dynamic=False)
        self._run = step

    def _step(self, x: Tensor, t: Tensor, y: Tensor, null: Tensor, a: Tensor, a_prev: Tensor) -> Tensor:
        return guided_ddim_step(self.model, x, t, y, null, a, a_prev, self.guidance)

    def _buffers(self) -> None:
        dev = self.device
        self._x = torch.zeros(self.shape, device=dev)
        self._t = torch.zeros((self.batch, self.tokens) if self.tokens else self.batch, dtype=torch.long, device=dev)
        self._y = torch.zeros(self.batch, dtype=torch.long, device=dev)
        self._null = torch.full((self.batch,), self.null_label, dtype=torch.long, device=dev)
        a_shape = (1, 1, self.shape[2], 1, 1) if self.tokens else ()
        self._a = torch.full(a_shape, 0.5, device=dev)  # any value in (0, 1) keeps the warm-up finite
        self._a_prev = torch.full(a_shape, 0.5, device=dev)

    def _replay_step(self) -> None:
        self._x.copy_(self._step(self._x, self._t, self._y, self._null, self._a, self._a_prev))

    def _capture(self) -> None:
        """Static buffers, warm-up on a side stream (as capture wants), then the step captured once."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self._buffers()
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(3):
                        self._replay_step()
                torch.cuda.current_stream(self.device).wait_stream(side)
                self._graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self._graph):
                    self._replay_step()
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def __call__(
        self, labels: Sequence[int] | Tensor, steps: int = 50, seed: int = 0,
        trajectory: list[tuple[Tensor, int | Tensor]] | None = None,
    ) -> Tensor:
        """Videos ``[batch, C, T, H, W]`` in [0, 1] for ``labels`` (``batch`` class ids), as `SpacetimeDiT.sample`
        gives them for the same ``steps``, ``seed`` and guidance; ``trajectory`` receives ``(x_t, t)`` per step."""
        y = torch.as_tensor(labels, dtype=torch.long).reshape(-1).to(self.device)
        if y.shape[0] != self.batch:
            raise ParticlizeError(f"{y.shape[0]} labels for a sampler built for batch={self.batch}: pass {self.batch} "
                                  "labels or build a FastSampler for this batch size")
        plan = self.model.plan(steps, self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            if self._graph is not None:
                return self._sample_graph(y, plan, seed, trajectory)
            x = initial_noise(self.shape, seed, self.device, self.frame_corr)
            null = torch.full_like(y, self.null_label)
            for t, a, a_prev in plan:
                if trajectory is not None:
                    trajectory.append((x.clone(), t))
                x = self._call_step(x, step_ids(t, self.batch, self.device), y, null, a, a_prev)
            return ((x + 1) / 2).clamp(0, 1)
        finally:
            self.model.train(was_training)

    def _call_step(self, *args: Tensor) -> Tensor:
        if self.mode != "compile" or self._compiled_ok:
            return self._run(*args)
        try:  # the first call compiles: report a toolchain failure as such, not as a deep inductor trace
            out = self._run(*args)
        except Exception as e:
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise ParticlizeError(f"torch.compile could not build the sampling step ({type(e).__name__}: {msg}): "
                                  "use mode='eager'") from e
        self._compiled_ok = True
        return out

    def _sample_graph(self, y: Tensor, plan: Plan, seed: int, trajectory: list[tuple[Tensor, int | Tensor]] | None) -> Tensor:
        assert self._graph is not None
        self._x.copy_(initial_noise(self.shape, seed, self.device, self.frame_corr))
        self._y.copy_(y)
        for t, a, a_prev in plan:
            if trajectory is not None:
                trajectory.append((self._x.clone(), t))
            self._t.copy_(step_ids(t, self.batch, self.device))
            self._a.copy_(a)
            self._a_prev.copy_(a_prev)
            self._graph.replay()
        return ((self._x + 1) / 2).clamp(0, 1)
