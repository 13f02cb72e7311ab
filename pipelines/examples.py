"""Training examples for the verbalizer objective, built exactly as serving builds prompts."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rcllm_sdk.prompt import ItemInfo, PromptTemplate, render
from rcllm_sdk.retrieval import Retriever


@dataclass(slots=True, frozen=True)
class Example:
    history: tuple[int, ...]
    candidates: tuple[int, ...]
    target: int  # index of the true next item in ``candidates``


def build_examples(sequences: list[list[int]], retriever: Retriever, k: int, min_history: int = 2,
                   max_examples: int = 20_000, seed: int = 0) -> tuple[list[Example], dict]:
    """One example per (user, position) whose true next item the retriever ranked in its top ``k``.

    Positions whose truth the retriever missed are left out (they teach nothing about ranking
    the candidates the server will show, measured in the README); the count is returned.
    """
    rng = np.random.default_rng(seed)
    pairs = [(u, t) for u, seq in enumerate(sequences) for t in range(min_history, len(seq))]
    rng.shuffle(pairs)
    examples, missed = [], 0
    for u, t in pairs:
        if len(examples) >= max_examples:
            break
        history, truth = sequences[u][:t], sequences[u][t]
        candidates = retriever.candidates(history, k)
        if truth not in candidates:
            missed += 1
            continue
        examples.append(Example(tuple(history), tuple(candidates), candidates.index(truth)))
    looked = len(examples) + missed
    return examples, {"examples": len(examples), "retriever_missed": missed,
                      "retriever_hit_rate": len(examples) / max(looked, 1)}


def encode(example: Example, catalog: dict[int, ItemInfo], template: PromptTemplate, tokenizer) -> list[int]:
    prompt = render([catalog[i] for i in example.history], [catalog[i] for i in example.candidates],
                    template, tokenizer, fingerprint="train")
    return prompt.input_ids
