"""The geometry of the zero-loss manifold, in pure torch: constraint Jacobians, tangent projections, Eq. 20.

No Lightning here: the callbacks gather data and parameters and call into this package.
"""

from grok_lightning.geometry.decoupled import (
    FLOW_ACTIVATIONS,
    FlowActivation,
    SingularGramError,
    activation_and_slope,
    eq20_flow,
    gram_cholesky,
    reduced_cost,
)
from grok_lightning.geometry.operator import CONSTRAINT_KINDS, ConstraintKind, ConstraintOperator, evaluation_scope
from grok_lightning.geometry.precondition import ReadoutPreconditioner
from grok_lightning.geometry.projection import METHODS, Method, MinNormSolution, ProjectionResult, TangentProjector
from grok_lightning.geometry.solvers import LSQRResult, batched_lsqr

__all__ = [
    "CONSTRAINT_KINDS",
    "FLOW_ACTIVATIONS",
    "METHODS",
    "ConstraintKind",
    "ConstraintOperator",
    "FlowActivation",
    "LSQRResult",
    "Method",
    "MinNormSolution",
    "ProjectionResult",
    "ReadoutPreconditioner",
    "SingularGramError",
    "TangentProjector",
    "activation_and_slope",
    "batched_lsqr",
    "eq20_flow",
    "evaluation_scope",
    "gram_cholesky",
    "reduced_cost",
]
