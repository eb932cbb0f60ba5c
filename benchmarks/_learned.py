"""An experiment (session 14, issue 5): particle importance from gates *learned* under the FLOPs budget.

Every head and FFN neuron gets a hard-concrete gate (Louizos et al., 2018; the L0 gates of CoFi); with the
weights frozen, the gate logits are trained to keep the model's own outputs (KL at temperature 2 against the
ungated model) while a Lagrangian pulls the expected share of prunable FLOPs kept down to the budget (the target
falls linearly over the first half of the steps). The learned logits then rank the particles for `allocate`
(importance / price is monotone in the logit), so floors, ``round_to`` and the exact FLOPs goal apply as for any
scorer. Used by ``compress_minilm.py --variants pz-oneshot-learned``; not a compress scorer (RESULTS.md says why).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from particlize.particles import batch_inputs
from particlize.tasks.base import logits_of

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1


def _sample(log_alpha: torch.Tensor) -> torch.Tensor:
    u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def _p_open(log_alpha: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def learned_importance(pm, batches, keep: float, kinds, seq_len: int, steps: int = 200, lr: float = 0.1,
                       temperature: float = 2.0, warmup: float = 0.5, log=print) -> dict[str, torch.Tensor]:
    model = pm.model
    groups = [g.name for g in pm.groups if g.kind in kinds]
    table = pm.table(seq_len=seq_len).set_index(["group", "index"])
    costs = {n: torch.tensor(table.loc[n].sort_index().flops.to_numpy(), dtype=torch.float32) for n in groups}
    total = pm.cost(seq_len=seq_len).flops
    prunable = float(sum(c.sum() for c in costs.values()))
    fixed = total - prunable
    target = (keep * total - fixed) / prunable  # share of the prunable FLOPs to keep
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        teacher = [logits_of(model, batch_inputs(b)) for b in batches]
    la = {n: torch.full((pm[n].size,), 3.0, requires_grad=True) for n in groups}
    lam = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam(list(la.values()), lr=lr)
    opt_l = torch.optim.Adam([lam], lr=lr, maximize=True)
    for step in range(steps):
        i = step % len(batches)
        t = 1 - (1 - target) * min(1.0, step / max(1, warmup * steps))
        with pm.gates({n: _sample(v) for n, v in la.items()}) as m:
            out = logits_of(m, batch_inputs(batches[i]))
        kd = F.kl_div(F.log_softmax(out / temperature, -1), F.log_softmax(teacher[i] / temperature, -1),
                      log_target=True, reduction="batchmean") * temperature**2
        exp = sum((_p_open(la[n]) * costs[n]).sum() for n in groups) / prunable
        gap = exp - t
        loss = kd + lam[0] * gap + lam[1] * gap**2
        opt.zero_grad()
        opt_l.zero_grad()
        loss.backward()
        opt.step()
        opt_l.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"  gates step {step}: kd {kd.item():.4f} expected kept {exp.item():.3f} (target {t:.3f}) "
                f"lambda {lam[0].item():.2f},{lam[1].item():.2f}")
    for p, r in zip(model.parameters(), req):
        p.requires_grad_(r)
    model.train(was_training)
    # rank by the learned logit: importance / price (allocate's ranking) is then monotone in log alpha
    hi = max(float(v.detach().max()) for v in la.values())
    return {n: (la[n].detach() - hi).exp().double() * costs[n].double() for n in groups}


def learned_scorer(keep: float, steps: int, seq_len: int):
    """A compress scorer (``compress(..., scorer=learned_scorer(...))``) ranking particles by gates learned for
    ``keep`` of the FLOPs. The gates are learned once and reused by every call (the cut without and with recovery
    start from the same dense model)."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def importance(pm, batches, kinds):
        if "imp" not in cache:
            cache["imp"] = learned_importance(pm, batches, keep, kinds, seq_len, steps=steps)
        return cache["imp"]

    return importance
