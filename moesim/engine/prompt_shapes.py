"""The prompts each rank's batch prefills, for an engine whose host cost counts them
(``host.per_prompt_layer_us``: each prompt's own kernels per layer;
``host.first_prompt_length_us``: once per prompt length the engine process has not run
before, the attention kernel's set-up for a new shape)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from moesim.engine.batching import Batch


class PromptShapes:
    """Per rank, the prompt lengths its engine process has run (its warm-up's first)."""

    def __init__(self, ranks: int, warm: Iterable[int], prompt: Sequence[int]) -> None:
        self.seen = [set(warm) for _ in range(ranks)]
        self.prompt = prompt

    def count(self, batches: Sequence[Batch]) -> tuple[list[int], list[int]]:
        """Per rank: the prompts (or prompt chunks: requests computing tokens before their
        prompt's end) its batch prefills, and how many distinct lengths among them it has
        not run before (remembered from now on)."""
        prompts, new = [], []
        for seen, b in zip(self.seen, batches):
            if b.steady or len(b.ids) == b.decodes:
                prompts.append(0)
                new.append(0)
                continue
            prompt = self.prompt
            lengths = [
                n for rid, n, c in zip(b.ids, b.new_tokens, b.cached_tokens) if c < prompt[rid]
            ]
            fresh = set(lengths) - seen
            seen |= fresh
            prompts.append(len(lengths))
            new.append(len(fresh))
        return prompts, new
