"""The constraint Jacobian of a module on a fixed constraint set, as a matrix-free linear operator.

Notation (design notes §1): parameters θ ∈ R^P, constraint map F: R^P → R^m, Jacobian J = ∂F/∂θ ∈ R^{m×P}.
With ``kind="outputs"``, F(θ) stacks every output of every constraint sample (m = n·C, the paper's zero-loss
manifold Z = {F(θ) = Y}); with ``kind="losses"``, F(θ) = (ℓ₁(θ), …, ℓₙ(θ)) has one entry per sample (m = n).

Conventions:

* Vectors over parameters are flat 1-D tensors of length P, the trained parameters flattened in the order
  given (each parameter row-major); :meth:`ConstraintOperator.flatten` and :meth:`~ConstraintOperator.unflatten`
  convert. Vectors over constraints are flat of length m, sample-major. Products accept any floating dtype
  and return the dtype they were given, but are computed in the parameters' dtype.
* F is evaluated as in eval mode: no dropout, BatchNorm uses its running statistics; buffers are cloned so
  nothing can write to the module's; the mode of every submodule is restored; the global RNG state is
  saved and restored around every forward; nothing is recorded for ``.backward()`` and no ``.grad`` is set.
* Only the trained parameters vary; other parameters and the buffers are held at their current values.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, linearize, vjp, vmap

ConstraintKind = Literal["outputs", "losses"]
CONSTRAINT_KINDS: tuple[str, ...] = ("outputs", "losses")


@contextmanager
def evaluation_scope(module: nn.Module) -> Iterator[None]:
    """Run a block with ``module`` in eval mode, the global RNG untouched and autograd recording off.

    Every submodule's ``training`` flag is restored afterwards (modes may be mixed), and the CPU and CUDA
    generators are saved and restored, so any draw inside the block is invisible outside it.
    """
    modes = [(m, m.training) for m in module.modules()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        module.eval()
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


class ConstraintOperator:
    """The Jacobian J = ∂F/∂θ of a constraint map at the current parameters, without materializing it.

    The linearization at θ is built lazily and cached: one forward pass with :func:`torch.func.vjp`, whose
    saved activations serve every Jᵀ·u, and, on the first J·v only, the transpose of that closure (a
    :func:`torch.func.vjp` of u ↦ Jᵀu, which is linear in u: its vjp with cotangent v is J·v). The transpose
    reuses the saved activations, needs no forward pass and no tracing (under 1 ms to build, where
    :func:`torch.func.linearize` traced an FX graph for 75–115 ms at every θ), and costs about what a traced
    tangent graph does per product. Modules whose backward cannot be differentiated again (an error, or an
    ``autograd.Function`` with a ``once_differentiable`` backward, caught by an adjoint test ⟨u, Jv⟩ = ⟨Jᵀu, v⟩
    on the first J·v of the operator) fall back to :func:`torch.func.linearize`. The cache is keyed on the
    parameters' storage and version counters, so an in-place optimizer step (or any write to a trained
    parameter) invalidates it; call :meth:`refresh` after changing anything else (e.g. a frozen parameter or a
    buffer).

    Args:
        module: The network. Called as ``module(inputs)`` (or ``module(*inputs)`` for a tuple).
        inputs: Constraint inputs, a tensor (N, …) or a tuple of tensors sharing their first dimension N.
        params: The trained parameters (those of the optimizer's param groups), each a parameter of
            ``module``; ``None`` for every parameter with ``requires_grad``. Their order fixes the layout of
            flat parameter vectors.
        kind: ``"outputs"``: one constraint per output entry, F(θ) = module(x) flattened (m = N·C): the
            zero-loss manifold F(θ) = Y. ``"losses"``: one constraint per sample, F(θ)ᵢ = ℓᵢ(θ) (m = N):
            a coarser constraint set whose null space contains that of ``"outputs"``, so its tangent space is
            larger (dimension ≥ P − N instead of ≥ P − N·C) and tangent fractions come out larger. It keeps
            the per-sample losses at their current values, which is the zero-loss manifold only where
            every loss is at its minimum; cheaper (m = N) and usable where nC > P makes "outputs" trivial.
        targets: Targets (N, …), required for ``kind="losses"``.
        loss_fn: Per-sample loss ``loss_fn(outputs, targets) -> (N,)``, required for ``kind="losses"``.
        output_fn: Optional map applied to the module's output before flattening (e.g. pick a tensor
            from a tuple, or select output columns), returning (N, …).
        probe_size: If given, keep only this many samples, drawn once without replacement by a private
            generator seeded with ``seed`` (the global RNG is never used). Fewer constraints mean a larger
            tangent space, so tangent fractions are overestimated.
        seed: Seed of the probe subset.

    Raises:
        ValueError: If an argument has the wrong type or value, a parameter does not belong to ``module``,
            or the inputs are empty.

    Example:
        >>> net = nn.Linear(2, 1, bias=False)
        >>> op = ConstraintOperator(net, torch.ones(1, 2))
        >>> op.jacobian()
        tensor([[1., 1.]], dtype=torch.float64)
    """

    def __init__(
        self,
        module: nn.Module,
        inputs: Tensor | tuple[Tensor, ...],
        params: Sequence[Tensor] | None = None,
        *,
        kind: ConstraintKind = "outputs",
        targets: Tensor | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        output_fn: Callable[[object], Tensor] | None = None,
        probe_size: int | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"Expected argument `module` to be an nn.Module, but got {type(module).__name__}.")
        if kind not in CONSTRAINT_KINDS:
            raise ValueError(f"Expected argument `kind` to be one of {CONSTRAINT_KINDS}, but got {kind!r}.")
        inputs_tuple = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        if not inputs_tuple or not all(isinstance(x, Tensor) and x.dim() >= 1 for x in inputs_tuple):
            raise ValueError(
                f"Expected argument `inputs` to be a tensor or a tuple of tensors with a batch dimension, "
                f"but got {type(inputs).__name__}."
            )
        n = inputs_tuple[0].shape[0]
        if n == 0 or any(x.shape[0] != n for x in inputs_tuple):
            raise ValueError(
                f"Expected argument `inputs` to share a non-empty first dimension, but got shapes "
                f"{[tuple(x.shape) for x in inputs_tuple]}."
            )
        if kind == "losses" and (targets is None or loss_fn is None):
            raise ValueError(
                f"Expected arguments `targets` and `loss_fn` to be given for kind='losses', but got "
                f"targets={type(targets).__name__}, loss_fn={type(loss_fn).__name__}."
            )
        if targets is not None and (not isinstance(targets, Tensor) or targets.shape[0] != n):
            raise ValueError(
                f"Expected argument `targets` to be a tensor with first dimension {n}, but got "
                f"{tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__}."
            )
        if probe_size is not None and (
            isinstance(probe_size, bool) or not isinstance(probe_size, int) or probe_size < 1
        ):
            raise ValueError(
                f"Expected argument `probe_size` to be a positive integer or None, but got {probe_size!r}."
            )

        names_by_id = {id(p): name for name, p in module.named_parameters()}
        if params is None:
            params = [p for p in module.parameters() if p.requires_grad]
        params = list(params)
        if not params:
            raise ValueError("Expected argument `params` to hold at least one parameter, but got none.")
        for p in params:
            if id(p) not in names_by_id:
                raise ValueError(
                    f"Expected argument `params` to hold parameters of `module`, but got a tensor of shape "
                    f"{tuple(p.shape)} that is not one."
                )
        if len({id(p) for p in params}) != len(params):
            raise ValueError("Expected argument `params` to hold each parameter once, but got a duplicate.")
        if len({p.dtype for p in params}) != 1 or not params[0].is_floating_point():
            dtypes = sorted({str(p.dtype) for p in params})
            raise ValueError(f"Expected argument `params` to share one floating dtype, but got {dtypes}.")

        # The probe subset: a private generator, never the global RNG.
        self.sample_index: Tensor | None = None
        if probe_size is not None and probe_size < n:
            generator = torch.Generator().manual_seed(seed)
            self.sample_index = torch.randperm(n, generator=generator)[:probe_size].sort().values
            index = self.sample_index.to(inputs_tuple[0].device)
            inputs_tuple = tuple(x[index] for x in inputs_tuple)
            targets = targets[index.to(targets.device)] if targets is not None else None

        self.module = module
        self.kind = kind
        self.inputs = inputs_tuple
        self.targets = targets
        self.loss_fn = loss_fn
        self.output_fn = output_fn
        self.params = params
        self.names = [names_by_id[id(p)] for p in params]
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.num_params = sum(self.numels)
        self.num_samples = inputs_tuple[0].shape[0]
        self.dtype = params[0].dtype
        self.device = params[0].device
        self._key: tuple | None = None
        self._value: Tensor | None = None
        self._vjp_fn: Callable | None = None
        self._jvp_fn: Callable | None = None  # built on the first J·v at each θ
        self._jvp_traced = False  # whether `_jvp_fn` is a linearize graph (the fallback) or the transpose
        self._transpose_checked = False  # whether the transpose passed the adjoint test (once per operator)
        self._primals: tuple[Tensor, ...] | None = None
        self._frozen: dict[str, Tensor] = {}
        self.num_constraints = int(self.value().numel())

    # ------------------------------------------------------------------ layout of parameter vectors

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate one tensor per trained parameter (same shapes) into a flat vector (P,)."""
        if len(tensors) != len(self.shapes) or any(t.shape != s for t, s in zip(tensors, self.shapes, strict=True)):
            raise ValueError(
                f"Expected argument `tensors` to match the parameter shapes {[tuple(s) for s in self.shapes]}, "
                f"but got {[tuple(t.shape) for t in tensors]}."
            )
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Split a flat vector (P,) (or a batch (k, P)) into views shaped like the trained parameters."""
        self._check_vector(vector, self.num_params, "vector")
        lead = vector.shape[:-1]
        return [c.reshape(*lead, *s) for c, s in zip(vector.split(self.numels, dim=-1), self.shapes, strict=True)]

    def parameter_vector(self) -> Tensor:
        """The current trained parameters θ as a flat vector (P,) (a copy, detached)."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def segments(self) -> list[slice]:
        """The slice of the flat vector that holds each trained parameter, in order."""
        bounds, start = [], 0
        for numel in self.numels:
            bounds.append(slice(start, start + numel))
            start += numel
        return bounds

    # ------------------------------------------------------------------ the constraint map

    def _function(self, *primals: Tensor) -> Tensor:
        state = dict(self._frozen)
        state.update(zip(self.names, primals, strict=True))
        out = functional_call(self.module, state, self.inputs)
        if self.output_fn is not None:
            out = self.output_fn(out)
        if self.kind == "losses":
            out = self.loss_fn(out, self.targets)
            if out.shape != (self.num_samples,):
                raise ValueError(
                    f"Expected argument `loss_fn` to return one loss per sample, shape ({self.num_samples},), "
                    f"but got {tuple(out.shape)}."
                )
        return out.reshape(-1)

    def _state_key(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.params)

    def refresh(self) -> None:
        """Drop the cached linearization; the next product re-linearizes at the current parameters."""
        self._key = None
        self._value = self._vjp_fn = self._jvp_fn = self._primals = None

    def _linearize(self) -> None:
        key = self._state_key()
        if key == self._key:
            return
        trained = {id(p) for p in self.params}
        # Held fixed: the other parameters (detached) and the buffers (cloned: nothing can write to them).
        self._frozen = {n: p.detach() for n, p in self.module.named_parameters() if id(p) not in trained}
        self._frozen.update({n: b.detach().clone() for n, b in self.module.named_buffers()})
        primals = tuple(p.detach().clone() for p in self.params)
        with evaluation_scope(self.module):
            value, self._vjp_fn = vjp(self._function, *primals)
        self._value = value.detach()
        self._primals = primals
        self._jvp_fn = None
        self._key = key

    def _tangent_map(self) -> Callable:
        # J·v at the cached θ, built on first use: the transpose of the vjp closure (cheap), or a traced
        # linearize graph where the backward cannot be differentiated again (see the class docstring).
        self._linearize()
        if self._jvp_fn is None:
            with evaluation_scope(self.module):
                if not self._jvp_traced:
                    _, transpose = vjp(self._vjp_fn, torch.zeros_like(self._value))
                    self._jvp_fn = lambda *tangents: transpose(tangents)[0]
                    if not self._transpose_checked:
                        self._jvp_traced = not self._adjoint_holds()
                        self._transpose_checked = True
                        if self._jvp_traced:
                            self._jvp_fn = None
                            return self._tangent_map()
                else:
                    with warnings.catch_warnings():
                        # linearize's constant folding warns about an attribute it inserts itself: harmless.
                        warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
                        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated")
                        _, self._jvp_fn = linearize(self._function, *self._primals)
        return self._jvp_fn

    def _adjoint_holds(self) -> bool:
        # ⟨u, J v⟩ = ⟨Jᵀu, v⟩ for one random pair (a private generator): the transpose is J unless some operation
        # lacks a true double backward (e.g. an autograd.Function with a once_differentiable backward, which
        # functorch silently treats as constant in u). Checked once per operator: the module's structure decides.
        generator = torch.Generator(device=self.device).manual_seed(0)
        u = torch.randn(self._value.shape, generator=generator, device=self.device, dtype=self.dtype)
        v = [torch.randn(s, generator=generator, device=self.device, dtype=self.dtype) for s in self.shapes]
        with torch.no_grad():
            jv = self._jvp_fn(*v)
            jtu = self._vjp_fn(u)
            left = float(u @ jv)  # host sync, once per operator
            right = float(sum((a * b).sum() for a, b in zip(jtu, v, strict=True)))
            scale = float(u.norm() * jv.norm()) + float(sum(a.norm() ** 2 for a in jtu) ** 0.5) * float(
                sum(b.norm() ** 2 for b in v) ** 0.5
            )
        return abs(left - right) <= torch.finfo(self.dtype).eps ** 0.5 * scale

    def value(self) -> Tensor:
        """F(θ) at the current parameters, flat (m,)."""
        self._linearize()
        return self._value

    # ------------------------------------------------------------------ products

    @staticmethod
    def _check_vector(vector: Tensor, size: int, name: str) -> None:
        if not isinstance(vector, Tensor) or vector.dim() not in (1, 2) or vector.shape[-1] != size:
            raise ValueError(
                f"Expected argument `{name}` to be a tensor of shape ({size},) or (k, {size}), but got "
                f"{tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__}."
            )
        if not vector.is_floating_point():
            raise ValueError(f"Expected argument `{name}` to be floating point, but got {vector.dtype}.")

    def jvp(self, v: Tensor) -> Tensor:
        """J·v: the first-order change of the constraints along parameter direction(s) v.

        Args:
            v: (P,) or a batch (k, P).

        Returns:
            (m,) or (k, m), in the dtype of ``v``.
        """
        self._check_vector(v, self.num_params, "v")
        tangent_map = self._tangent_map()

        def single(flat: Tensor) -> Tensor:
            tangents = [c.reshape(s) for c, s in zip(flat.split(self.numels), self.shapes, strict=True)]
            return tangent_map(*tangents)

        w = v.to(self.dtype)
        try:
            with torch.no_grad():
                out = single(w) if v.dim() == 1 else vmap(single)(w)
        except RuntimeError:
            if self._jvp_traced:
                raise
            # No double-backward formula for some operation of the module: trace the tangent graph instead.
            self._jvp_traced, self._jvp_fn = True, None
            return self.jvp(v)
        return out.to(v.dtype)

    def vjp(self, u: Tensor) -> Tensor:
        """Jᵀ·u: the parameter direction(s) that pull the constraints along u (a gradient, for u = ∂ℓ/∂F).

        Args:
            u: (m,) or a batch (k, m).

        Returns:
            (P,) or (k, P), in the dtype of ``u``.
        """
        self._check_vector(u, self.num_constraints, "u")
        self._linearize()

        def single(flat: Tensor) -> Tensor:
            return torch.cat([g.reshape(-1) for g in self._vjp_fn(flat)])

        w = u.to(self.dtype)
        with torch.no_grad():
            out = single(w) if u.dim() == 1 else vmap(single)(w)
        return out.to(u.dtype)

    def jacobian(self, chunk_size: int = 1024) -> Tensor:
        """Materialize J (m, P) in float64, in chunks of ``chunk_size`` rows (vmapped Jᵀ·eᵢ).

        Memory: m·P·8 bytes for the result plus about ``chunk_size``·P·4 bytes of work space.
        """
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"Expected argument `chunk_size` to be a positive integer, but got {chunk_size!r}.")
        m = self.num_constraints
        out = torch.empty(m, self.num_params, dtype=torch.float64, device=self.device)
        for start in range(0, m, chunk_size):
            stop = min(start + chunk_size, m)
            basis = torch.zeros(stop - start, m, dtype=self.dtype, device=self.device)
            basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            out[start:stop] = self.vjp(basis)
        return out
