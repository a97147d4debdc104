"""egnn.comm: halo plans and halo exchange backends for the distributed model.

Installed as the sub-package `egnn.comm` (never a top-level `comm`, which Jupyter owns)."""
