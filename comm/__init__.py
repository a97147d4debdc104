"""egnn.comm: halo plans and halo exchange backends for the distributed model.

Installed as the sub-package `egnn.comm` (never a top-level `comm`, which Jupyter owns).

    plan = HaloPlan.build(graph, parts, rank, world_size)   # or build_plans(graph, parts, world)
    x = halo_exchange(x, plan)                               # differentiable, torch.distributed
"""
from .exchange import BACKENDS, CupyBackend, HaloExchange, TorchBackend, halo_exchange, make_backend
from .plan import HaloPlan, build_plans
from .timing import COMM_PHASES, PhaseTimer

__all__ = ["HaloPlan", "build_plans", "halo_exchange", "HaloExchange", "PhaseTimer", "COMM_PHASES",
           "TorchBackend", "CupyBackend", "make_backend", "BACKENDS"]
