"""Surgery: the verbs that change a model's structure, one module each, registered with the core's
`particlize.plan` registry so that `ParticleMap.prune`, `particlize.plan.run` and `particlize.load` find them.

- `prune` (``surgery/prune.py``): cut particles out; a genuinely smaller dense model.
- `bias`, `merge`, `refit` (``surgery/compensate.py``): before a prune, let the kept particles' reader
  absorb what is cut (``pm.prune(remove, compensate=..., data=...)``).
- `moefy` (``surgery/moefy.py``): a dense FFN becomes a mixture of experts (`ExpertFFN`) whose tokens run
  only their top-k experts.
"""

from __future__ import annotations

from torch import nn

from ..adapters import decompose
from ..gates import ResidualGate
from ..particles import ParticleMap, Remove
from ..plan import PROVENANCE, kept_indices, model_plan, provenance
from ._tensors import input_moments, linear_reader_weight
from ._experts import ExpertFFN, Router
from .compensate import BIAS, MERGE, REFIT, Bias, Merge, Refit
from .moefy import MOEFY, Moefy, moefy_model
from .prune import PRUNE, Prune
from .shard import SHARD, Shard, is_sharded, layout, shard_model  # noqa: F401  (the shard verb: particlize.parallel)
from .on_meta import default_init, empty_parameters, materialize  # noqa: F401  (re-exported by particlize.parallel)


def plan_step(pm: ParticleMap, remove: Remove) -> dict[str, list[int]]:
    """``{group: removed indices}`` → ``{group: kept indices}`` (groups losing nothing left out)."""
    return kept_indices(pm, pm.removed_sets(remove))


def block_correspondence(teacher: nn.Module, student: nn.Module) -> list[tuple[str, str]]:
    """``[(teacher block path, student block path), ...]``: where each block of a pruned ``student``
    came from in ``teacher``, read from the plans (the student's plan must extend the teacher's).
    Blocks keep their width of the residual stream, so their outputs can be compared one to one (the
    layer-wise distillation of recovery); empty when the student does not descend from the teacher."""
    t_plan, s_plan = model_plan(teacher), model_plan(student)
    if not s_plan.startswith(t_plan):
        return []
    t_pm, s_pm = decompose(teacher), decompose(student)
    pairs = []
    for sg in s_pm.select("block"):
        if sg.name not in t_pm:
            continue
        tg = t_pm[sg.name]
        origin = list(range(tg.size))
        for step in s_plan[len(t_plan):]:
            if step.verb == "prune" and step.group == sg.name:
                origin = [origin[i] for i in step.args["keep"]]
        if len(origin) == sg.size and isinstance(sg.gate, ResidualGate) and isinstance(tg.gate, ResidualGate):
            pairs += [(tg.gate.modules[o], sg.gate.modules[j]) for j, o in enumerate(origin)]
    return pairs


__all__ = [
    "BIAS", "Bias", "ExpertFFN", "MERGE", "MOEFY", "Merge", "Moefy", "Router", "moefy_model", "PROVENANCE", "PRUNE", "Prune", "REFIT", "Refit", "block_correspondence",
    "input_moments", "linear_reader_weight", "plan_step", "provenance",
]
