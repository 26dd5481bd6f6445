"""Next-token logits of long sequences without holding ``[N, vocab]`` at once.

A 32K-token sequence of a 262K-vocabulary model (Gemma 3) has 34 GB of float32 logits. The
harness keeps the final hidden states ``[N, d]`` instead and computes logits rows on demand, in
chunks: :class:`LazyLogits` slices like a tensor (``lg[s:e]`` is another lazy view; ``.float()``,
``.argmax(-1)`` materialise those rows). :func:`forward_logits` picks the lazy form only where the
full tensor would be large (``LAZY_ABOVE`` elements) and the model's head is one it can reproduce
(``lm_head`` plus an optional ``final_logit_softcapping``); otherwise it returns the model's logits.
"""

from __future__ import annotations

import torch

#: logits tensors above this many elements (1 GiB of float32) are computed lazily
LAZY_ABOVE = 1 << 28


class LazyLogits:
    """Logits rows ``[N, V]`` of one sequence from its final hidden states ``[N, d]``."""

    def __init__(self, model: torch.nn.Module, hidden: torch.Tensor) -> None:
        self._head = model.get_output_embeddings()
        self._cap = getattr(model.config.get_text_config() if hasattr(model.config, "get_text_config")
                            else model.config, "final_logit_softcapping", None)
        self.hidden = hidden

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), self._head.weight.shape[0]))

    def __getitem__(self, idx: slice) -> LazyLogits:
        if not isinstance(idx, slice):
            raise TypeError("LazyLogits takes a slice of positions")
        out = LazyLogits.__new__(LazyLogits)
        out._head, out._cap, out.hidden = self._head, self._cap, self.hidden[idx]
        return out

    def float(self) -> torch.Tensor:
        with torch.no_grad():
            lg = self._head(self.hidden).float()
            if self._cap:
                lg = torch.tanh(lg / self._cap) * self._cap
        return lg

    def argmax(self, dim: int = -1) -> torch.Tensor:
        return self.float().argmax(dim)


def _lazy_ok(model: torch.nn.Module) -> bool:
    head = getattr(model, "get_output_embeddings", lambda: None)()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scaled = any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in ("logit_scale", "logits_scaling"))
    return isinstance(head, torch.nn.Linear) and hasattr(model, "get_decoder") and not scaled


def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor | LazyLogits:
    """Logits ``[N, V]`` of ``input_ids [1, N]`` (batch 1): the tensor, or :class:`LazyLogits` where
    ``N * V > LAZY_ABOVE`` and the model's head is a plain (optionally soft-capped) linear layer."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    vocab = head.weight.shape[0] if isinstance(head, torch.nn.Linear) else 0
    with torch.no_grad():
        if input_ids.shape[1] * vocab > LAZY_ABOVE and _lazy_ok(model):
            hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
            return LazyLogits(model, hidden[0])
        return model(input_ids).logits[0]


__all__ = ["LAZY_ABOVE", "LazyLogits", "forward_logits"]
