"""particlize: take a trained PyTorch model apart into particles and put a smaller one back together.

    import particlize as pz
    pm = pz.decompose(model)                       # ParticleMap: heads, neurons, channels, units, blocks
    df = pm.table()                                # one row per particle (pandas)
    with pm.ablate({"encoder.layer.3.attention.heads": [0, 5]}):
        y = model(x)                               # gated forward
    small = pm.prune({"encoder.layer.3.attention.heads": [0, 5]})   # a new, smaller dense model
    small = pm.prune(remove, compensate="merge", data=batches)      # ... kept particles absorb the cut ones
    moe = pz.moefy(model, batches, experts=32, active=4)           # each token runs 4 of 32 FFN experts
    pz.save(small, "out/"); again = pz.load("out/")
"""

from . import surgery  # noqa: F401  (registers the verbs: prune, bias, merge, refit)
from ._version import __version__
from .adapters import decompose
from .analysis import analyze, interactions, top_particles, validate_scores
from .errors import CheckpointError, GateError, ParticlizeError, PlanError, UnsupportedModelError
from .io import save
from .moe import moefy
from .parallel import shard, unshard
from .particles import Cost, InputGate, ParticleGroup, ParticleMap, ResidualGate, Slice, WeightMaskGate
from .plan import Plan, Step
from .sources import load_any as load

__all__ = [
    "CheckpointError", "Cost", "GateError", "InputGate", "ParticleGroup", "ParticleMap", "ParticlizeError",
    "Plan", "PlanError", "ResidualGate", "Slice", "Step", "UnsupportedModelError", "WeightMaskGate", "analyze", "decompose", "interactions", "load", "moefy", "save", "shard", "unshard",
    "top_particles", "validate_scores",
]
