"""The prompts each rank's batch prefills, for an engine whose host cost counts them
(``host.per_prompt_layer_us``: each prompt's own kernels per layer;
``host.first_prompt_length_us``: once per prompt length the engine process has not run
before, the attention kernel's set-up for a new shape)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from moesim.config.engine import EngineConfig, HostCost
from moesim.cost.iteration import IterationCost, IterationTime
from moesim.engine.batching import Batch


class PromptShapes:
    """Per rank, the prompt lengths its engine process has run (its warm-up's first)."""

    def __init__(
        self, ranks: int, warm: Iterable[int], prompt: Sequence[int], on: bool = True
    ) -> None:
        self.seen = [set(warm) for _ in range(ranks)]
        self.prompt = prompt
        self.on = on
        """Whether the engine's host cost counts prompts at all (else :meth:`apply` is a
        no-op)."""

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

    def apply(
        self,
        cost: IterationCost,
        it: IterationTime,
        batches: Sequence[Batch],
        tokens: list[int],
        sampled: list[int],
        kv_read: list[int],
    ) -> IterationTime:
        """``it`` with the host time of the prompts ``batches`` prefill (counted here);
        ``it`` itself where the engine counts none."""
        if not self.on:
            return it
        prompts, new = self.count(batches)
        return cost.with_prompts(it, tokens, sampled, kv_read, prompts, new)


def prompt_shapes(
    host: HostCost, engine: EngineConfig | None, ranks: int, prompt: Sequence[int]
) -> PromptShapes:
    """The counter of a serving loop: on for an engine whose host cost counts prompts or
    new prompt lengths, a no-op otherwise."""
    on = engine is not None and bool(host.per_prompt_layer_us or host.first_prompt_length_us)
    warm = engine.warm_prompt_lengths if engine is not None else ()
    return PromptShapes(ranks, warm, prompt, on)
