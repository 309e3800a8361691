"""PSGD's rivals, used as their authors advise and never re-implemented here.

Optional: ``pip install -e ".[compare]"`` installs ``pytorch-optimizer`` (SOAP, Shampoo and the
Muon used here), ``heavyball`` and MNIST-1D; kron-torch comes with the ``test`` extra. In an
``experiment.Config`` name them by dotted path (``"pytorch_optimizer.SOAP"``,
``"kron_torch.Kron"``, ...) or, for Muon, by ``MuonWithAdamW`` below.

Muon orthogonalises the momentum of *hidden* weight matrices only; its authors (Jordan et al.,
and ``pytorch_optimizer.Muon``'s documentation) put embeddings, the classifier head, biases and
gains under AdamW. ``MuonWithAdamW.from_model`` does that split from the module structure
(``hidden_weights``), which the experiment harness calls when a configuration names it.
"""

from __future__ import annotations

from pytorch_optimizer import Muon
from torch import nn

# pytorch_optimizer.Muon's own defaults: lr 0.02 for Muon, 3e-4 for its AdamW groups
ADAMW_LR_RATIO = 3e-4 / 2e-2


def hidden_weights(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(hidden, rest)``: the weights of dimension ≥ 2 that are neither an embedding's nor the
    last ``nn.Linear``'s (the head), and every other parameter (biases, gains, embeddings, the
    head). A convolution's kernel counts as hidden (Muon orthogonalises its flattened matrix)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = {id(p) for p in linears[-1].parameters()} if linears else set()
    embedded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
                for p in m.parameters()}  # fmt: skip
    hidden, rest = [], []
    for p in model.parameters():
        is_hidden = p.ndim >= 2 and id(p) not in head and id(p) not in embedded
        (hidden if is_hidden else rest).append(p)
    return hidden, rest


class MuonWithAdamW(Muon):
    """``pytorch_optimizer.Muon`` with its two groups made from a model: Muon at ``lr`` on the
    hidden weights, AdamW at ``adamw_lr`` (default ``lr × ADAMW_LR_RATIO``, the ratio of the
    package's defaults, so one learning-rate grid tunes both) on the rest."""

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        lr: float = 2e-2,
        adamw_lr: float | None = None,
        weight_decay: float = 0.0,
        **options,
    ) -> MuonWithAdamW:
        hidden, rest = hidden_weights(model)
        if not hidden:
            raise ValueError("the model has no hidden weight matrix for Muon")
        adamw_lr = lr * ADAMW_LR_RATIO if adamw_lr is None else adamw_lr
        groups = [
            {"params": hidden, "use_muon": True, "lr": lr, "weight_decay": weight_decay},
            {"params": rest, "use_muon": False, "lr": adamw_lr, "weight_decay": weight_decay},
        ]
        return cls([g for g in groups if g["params"]], **options)


__all__ = ["ADAMW_LR_RATIO", "MuonWithAdamW", "hidden_weights"]
