"""particlize: take a trained PyTorch model apart into particles and put a smaller one back together.

    import particlize as pz
    pm = pz.decompose(model)                       # ParticleMap: heads, neurons, channels, units, blocks
    df = pm.table()                                # one row per particle (pandas)
    with pm.ablate({"encoder.layer.3.attention.heads": [0, 5]}):
        y = model(x)                               # gated forward
    small = pm.prune({"encoder.layer.3.attention.heads": [0, 5]})   # a new, smaller dense model
    pz.save(small, "out/"); again = pz.load("out/")
"""

from .adapters import decompose
from .errors import CheckpointError, GateError, ParticlizeError, PlanError, UnsupportedModelError
from .io import load, save
from .analysis import analyze, top_particles, validate_scores
from .particles import Cost, InputGate, ParticleGroup, ParticleMap, ResidualGate, Slice, WeightMaskGate

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "Cost", "GateError", "InputGate", "ParticleGroup", "ParticleMap", "ParticlizeError",
    "PlanError", "ResidualGate", "Slice", "UnsupportedModelError", "WeightMaskGate", "analyze", "decompose", "load", "save",
    "top_particles", "validate_scores",
]
