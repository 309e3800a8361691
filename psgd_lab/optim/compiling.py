"""How the optimisers meet ``torch.compile`` without importing TorchDynamo when nobody compiles.

``torch.compiler.disable`` imports ``torch._dynamo`` (about 2 s) where it decorates, so a plain
``import psgd_lab`` paid for it in every process, notebook and worker. ``eager_under_compile``
keeps the same behaviour for a compiled training step (the optimiser step runs eagerly, outside
the graph) and imports TorchDynamo only once a step is called while compiling.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def eager_under_compile(fn: F) -> F:
    """``fn`` as itself when called eagerly; under ``torch.compile`` it is skipped by TorchDynamo
    (a graph break) and runs eagerly, as ``torch.compiler.disable`` would make it."""
    disabled = torch._disable_dynamo(fn)  # imports torch._dynamo at its first call only

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return call  # type: ignore[return-value]
