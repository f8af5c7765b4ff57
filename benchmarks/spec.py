"""What a benchmark is made of: cases (shapes), providers (with a reason when one can't run),
inputs, and the minimal byte count used for effective bandwidth. One module per op fills these
in (benchmarks/bench_*.py); the harness (benchmarks/harness.py) runs any of them the same way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MODES = ("fwd", "bwd", "full")


@dataclass(frozen=True)
class Case:
    """One input configuration: a shape and a dtype (``extra`` for op-specific knobs; ``name``,
    if given, prefixes the label, e.g. the model of an end-to-end case)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    extra: tuple[tuple[str, object], ...] = ()
    name: str = ""

    @property
    def label(self) -> str:
        dims = "x".join(str(s) for s in self.shape)
        return f"{self.name} {dims}" if self.name else dims

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Provider:
    """A way to compute the op: ``fn(*inputs) -> loss tensor``, or ``skip`` saying why not.
    ``modes``: the modes in which its timing is comparable (None: all); ``why_not``: the reason
    given for the others."""

    name: str
    fn: Callable[..., torch.Tensor] | None = None
    skip: str | None = None
    modes: tuple[str, ...] | None = None
    why_not: str = ""


@dataclass
class OpBench:
    """A benchmarked op.

    cases(device, size): the cases for ``size`` in {"smoke", "quick", "full"}.
    make_inputs(case, device): the inputs (leaves requiring grad where the op is differentiated).
    providers(device): every provider, usable or with a skip reason.
    min_bytes(case, mode): the fewest bytes any implementation must move (for GB/s).
    modes: which of fwd / bwd / full apply.
    bandwidth: whether GB/s and % of copy bandwidth mean anything (False for a whole training
    step: its rows are time and memory only; ``min_bytes`` then only sizes the case).
    interleave: time a case's providers against each other in alternating rounds
    (``common.time_interleaved``), all their inputs alive at once, instead of one after the
    other: for long calls, whose ratios a drift of the machine between providers would bend.
    """

    name: str
    cases: Callable[[torch.device, str], list[Case]]
    make_inputs: Callable[[Case, torch.device], list[torch.Tensor]]
    providers: Callable[[torch.device], list[Provider]]
    min_bytes: Callable[[Case, str], int]
    modes: tuple[str, ...] = field(default=MODES)
    bandwidth: bool = True
    interleave: bool = False
