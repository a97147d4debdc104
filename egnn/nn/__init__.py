"""Equivariant layers in the EquiformerV2/fairchem layout [rows, (lmax+1)^2, C], e3nn's real basis."""
from .activation import GateActivation
from .attention import AttentionAggregation, segment_softmax
from .layers import FeedForward, InteractionLayer, MessageBlock
from .linear import EquivariantLinear
from .norm import EquivariantLayerNorm
from .radial import GaussianRBF, RadialMLP, cosine_envelope
from .so2 import EdgeRotation, SO2Convolution, SO2Linear
from .fused import FusedInteractionLayer  # noqa: E402  (needs the layers above)

__all__ = [
    "EdgeRotation", "SO2Linear", "SO2Convolution", "AttentionAggregation", "segment_softmax",
    "GateActivation", "EquivariantLayerNorm", "EquivariantLinear", "GaussianRBF", "RadialMLP",
    "cosine_envelope", "FeedForward", "MessageBlock", "InteractionLayer", "FusedInteractionLayer",
]
