"""The optimisers: thin ``torch.optim`` classes over functional kernels.

- ``kron``: the ``Kron`` class (``step`` reads in one screen);
- ``flat``: ``LRA`` and ``Dense``, one preconditioner over a group's flattened parameters;
- ``kernels``: the single-tensor reference and the grouped multi-tensor kernel, tested equal;
- ``apply``: the clip over a group and the parameter update, with ``torch._foreach`` ops;
- ``newton``: the closure and Newton mode's ``(v, Hv)`` pairs;
- ``placement``: replicated, ``"shard"``, FSDP2 ``"full"`` and ``"local"``;
- ``checkpoint``: ``state_dict`` and its checks; ``streams``: per-parameter random streams;
- ``memory``: factor structure, the memory warning and budget, ``describe()``;
- ``config``: hyperparameter validation.
"""

from .flat import LRA, Dense
from .kron import Kron
from .memory import ParamInfo

__all__ = ["Dense", "Kron", "LRA", "ParamInfo"]
