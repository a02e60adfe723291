"""Compute kernels, each with a pure-MLX reference that is the tested contract.

Importing the package loads an optimized BLAS (blas.py: ctypes only, no mlx) so that whichever
module imports mlx later binds its GEMMs to it; every package whose modules import mlx imports
this one first (its __init__ does).
"""

from mlx_loom.kernels import blas as _blas

_blas.preload()
