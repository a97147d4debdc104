"""Loads the compiled extension egnn._C; without it egnn runs its pure-PyTorch paths and says so once."""
from .errors import warn_once

try:
    from . import _C  # noqa: F401  (registers the egnn:: torch ops)

    AVAILABLE = True
    ERROR = None
except ImportError as exc:  # the extension was skipped (EGNN_SKIP_EXT=1) or failed to build
    AVAILABLE = False
    ERROR = exc


def require(what: str) -> bool:
    """True when the extension is loaded; otherwise log once which fallback `what` uses."""
    if not AVAILABLE:
        warn_once("ext", f"egnn._C extension not available ({ERROR}); {what} uses the pure-PyTorch path. "
                  "Rebuild with `pip install --no-build-isolation -e .` to get the compiled ops.")
    return AVAILABLE
