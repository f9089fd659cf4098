"""Speculative decoding / multi-token prediction (issue 16): ``workload.speculative``.

Every decode step of a sequence verifies its pending token and ``draft_tokens`` (k) draft
tokens in one forward pass (k + 1 query tokens through attention, MoE and dense blocks,
logits at k + 1 positions), then keeps the pending token, the accepted drafts and one
token sampled after them: a step yields ``1 + a`` tokens, ``a`` the accepted drafts.
Acceptance is a chain: draft ``i`` counts only if drafts ``1 .. i-1`` were accepted, and
it is accepted with probability ``acceptance[i-1]`` (conditional on the ones before), so
a step yields ``1 + p1 + p1 p2 + ... + p1 ... pk`` tokens on average.

```yaml
workload:
  speculative:
    draft_tokens: 1          # k: drafts verified per step
    acceptance: 0.85         # one rate for every depth, or a list of k per-depth rates
    draft: mtp_module        # mtp_module | free
    source: "DeepSeek-V3 report Sec. 5.4.3: second-token acceptance 85-90%"
```

``draft`` is what producing the drafts costs: ``mtp_module`` runs a multi-token
prediction module (DeepSeek-V3 report Sec. 2.2: one transformer block, here a block like
the model's last, plus a projection of ``2 d_model -> d_model`` and the shared output
head) once per draft token over one token per drafting sequence; ``free`` prices no
drafter (a prompt-lookup draft, or to isolate the verification's cost).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from pydantic import Field, model_validator

from moesim.config.base import Frozen

DraftCost = Literal["mtp_module", "free"]


class SpeculativeConfig(Frozen):
    """Multi-token prediction / speculative decoding in decode steps (see the module)."""

    draft_tokens: int = Field(ge=1, le=16)
    """k: draft tokens verified with the pending token in each decode step."""
    acceptance: float | tuple[float, ...]
    """Probability that draft ``i`` is accepted given drafts ``1 .. i-1`` were: one rate
    for every depth, or ``draft_tokens`` rates, depth 1 first."""
    draft: DraftCost = "mtp_module"
    """What drafting costs: ``mtp_module`` (one transformer block + projection + output
    head per draft token, DeepSeek-V3's MTP module) or ``free``."""
    source: str | None = None
    """Where the acceptance rates come from."""

    @model_validator(mode="after")
    def _consistent(self) -> SpeculativeConfig:
        problems = list(self._problems())
        if problems:
            raise ValueError("\n".join(f"{f}: {m}" for f, m in problems))
        return self

    def _problems(self) -> Iterator[tuple[str, str]]:
        rates = (self.acceptance,) if isinstance(self.acceptance, float) else self.acceptance
        if not isinstance(self.acceptance, float) and len(rates) != self.draft_tokens:
            yield (
                "acceptance",
                f"give one rate or draft_tokens ({self.draft_tokens}) rates, got {len(rates)}",
            )
        for i, p in enumerate(rates):
            if not 0.0 <= p <= 1.0:
                yield "acceptance", f"rates are probabilities in [0, 1], got {p} at depth {i + 1}"

    @property
    def rates(self) -> tuple[float, ...]:
        """The per-depth conditional acceptance rates, ``draft_tokens`` of them."""
        a = self.acceptance
        return (float(a),) * self.draft_tokens if isinstance(a, float) else tuple(a)

    @property
    def expected_tokens_per_step(self) -> float:
        """Tokens one decode step yields on average: ``1 + p1 + p1 p2 + ...``."""
        total, chain = 1.0, 1.0
        for p in self.rates:
            chain *= p
            total += chain
        return total
