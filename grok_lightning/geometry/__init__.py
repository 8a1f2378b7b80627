"""The geometry of the zero-loss manifold, in pure torch: constraint Jacobians and tangent projections.

No Lightning here: the callbacks gather data and parameters and call into this package.
"""

from grok_lightning.geometry.operator import CONSTRAINT_KINDS, ConstraintKind, ConstraintOperator, evaluation_scope
from grok_lightning.geometry.precondition import ReadoutPreconditioner
from grok_lightning.geometry.projection import METHODS, Method, MinNormSolution, ProjectionResult, TangentProjector
from grok_lightning.geometry.solvers import LSQRResult, batched_lsqr

__all__ = [
    "CONSTRAINT_KINDS",
    "METHODS",
    "ConstraintKind",
    "ConstraintOperator",
    "LSQRResult",
    "Method",
    "MinNormSolution",
    "ProjectionResult",
    "ReadoutPreconditioner",
    "TangentProjector",
    "batched_lsqr",
    "evaluation_scope",
]
