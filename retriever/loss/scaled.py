"""`ScaledLoss`: the base of losses that own a logit scale (an inverse temperature), fixed or
learnable, stored as its logarithm so that it stays positive, and clamped to a range."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class ScaledLoss(nn.Module):
    """Holds ``log_scale`` (a parameter, learnable or not) and the range [min_scale, max_scale].

    The parameter itself is clamped, in place, each time the loss is computed (:meth:`clamp_`),
    not only the value it yields: a clamp of the value alone has zero gradient outside the
    range, so a parameter that an optimizer step pushed out could never come back. CLIP clamps
    at 100 for the same reason: a runaway scale makes the loss degenerate."""

    def __init__(
        self, scale: float, learnable_scale: bool, min_scale: float, max_scale: float
    ) -> None:
        super().__init__()
        if not 0 < min_scale <= scale <= max_scale:
            raise ValueError(
                f"need 0 < min_scale <= scale <= max_scale, got {min_scale}, {scale}, {max_scale}"
            )
        self.log_scale = nn.Parameter(
            torch.tensor(math.log(scale), dtype=torch.float32), requires_grad=learnable_scale
        )
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)

    @property
    def scale(self) -> Tensor:
        return self.log_scale.clamp(math.log(self.min_scale), math.log(self.max_scale)).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Put log(s) back into [log min_scale, log max_scale] (after an optimizer step)."""
        self.log_scale.clamp_(math.log(self.min_scale), math.log(self.max_scale))

    def forward(self, *args, **kwargs) -> Tensor:
        """Clamp the scale, then :meth:`compute` the loss (a wrapper that computes several
        terms, as `MatryoshkaLoss`, clamps once and calls ``compute``: clamping in place
        between two terms would change a parameter the first one's graph still needs)."""
        self.clamp_()  # the gradient is then that of s itself, also at the range's ends
        return self.compute(*args, **kwargs)

    def compute(self, *args, **kwargs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def scale_config(self) -> dict:
        return {
            "scale": float(self.scale.detach()),
            "learnable_scale": self.log_scale.requires_grad,
            "min_scale": self.min_scale,
            "max_scale": self.max_scale,
        }
