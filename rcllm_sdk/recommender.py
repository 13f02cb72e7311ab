"""``RcRecommender``: the facade. Features -> candidates -> blocks -> forward -> ranking."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from . import validation
from .config import RecommenderConfig
from .errors import EmptyHistoryError, FeatureRepoError, NotEnoughCandidatesError, UnknownUserError
from .features import FeatureClient
from .model.ranker import Ranker, load_ranker
from .model.scoring import score_full
from .model.tokenizer import label_token_ids
from .prompt import ItemInfo, PromptEncoder, RenderedPrompt
from .retrieval import Retriever
from .runtime.engine import BlockEngine
from .types import CacheStats, Recommendation


class RcRecommender:
    """Ranks a user's retrieved candidates with an LLM in one forward pass.

    A request reads the user's history from Feast, takes the retriever's top ``candidates``
    items, renders one block-structured prompt and reads the ranking from the label-token
    logits. ``mode`` chooses how the prompt is computed: ``rcllm`` reuses each block's cached
    KV and recomputes the policy's tokens, ``prefix`` reuses the longest cached token prefix,
    ``full`` runs the plain Hugging Face forward. Build one with :meth:`from_feature_store`;
    close it (or use ``with``) to release the KV store. Safe to call from several threads.

    Attributes:
        features: the Feast client the histories and item features come from.
        retriever: proposes the candidates.
        ranker: model, tokenizer, prompt template and fingerprint.
        config: the resolved :class:`RecommenderConfig`.

    Example:
        >>> with RcRecommender.from_feature_store("feature_repo/") as rec:
        ...     rec.recommend(user_id=42, k=10).item_ids
    """

    def __init__(
        self, features: FeatureClient, retriever: Retriever, ranker: Ranker, config: RecommenderConfig
    ):
        self.features, self.retriever, self.ranker, self.config = features, retriever, ranker, config
        if config.threads:
            torch.set_num_threads(config.threads)
        labels = ranker.template.labels[: config.candidates]
        if len(labels) < config.candidates:
            raise NotEnoughCandidatesError(
                f"the template has {len(labels)} labels; set candidates <= {len(labels)}"
            )
        self.label_ids = label_token_ids(ranker.tokenizer, labels)
        self.encoder = PromptEncoder(ranker.template, ranker.tokenizer)
        self.engine = None
        if config.mode != "full":
            from .cache import open_store  # lazy: LMCache is heavy and only needed when caching

            self.engine = BlockEngine(
                ranker,
                open_store(config.store, namespace=ranker.fingerprint),
                config.policy,
                config.attention,
                config.prefix_chunk,
                guard=config.guard,
            )
            if config.mode == "rcllm" and config.guard:
                self.engine.calibrate_guard()  # here, not inside the first request's latency

    def with_config(self, **overrides) -> RcRecommender:
        """A recommender sharing this one's features, retriever and ranker under changed
        settings, e.g. ``rec.with_config(mode="prefix")``; close it when done."""
        return RcRecommender(self.features, self.retriever, self.ranker, replace(self.config, **overrides))

    def close(self) -> None:
        """Release the KV store (remote connections, LMCache workers)."""
        if self.engine is not None:
            self.engine.close()
            self.engine.store.close()

    def __enter__(self) -> RcRecommender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def from_feature_store(
        cls,
        repo_path: str | Path,
        model: str | Path | None = None,
        config_file: str | Path | None = None,
        **config,
    ) -> RcRecommender:
        """Open an ingested feature repo and a ranker.

        Settings resolve as defaults < ``config_file`` < ``RCLLM_*`` environment < ``config``.

        Args:
            repo_path: a feature repo filled by ``rcllm ingest``.
            model: a local Hugging Face folder or an MLflow URI (``runs:/<run_id>/model``);
                defaults to ``<repo>/data/ranker``, where ``rcllm train`` saves.
            config_file: a YAML file of :class:`RecommenderConfig` fields.
            **config: :class:`RecommenderConfig` fields (``mode``, ``policy``, ``store``,
                ``candidates``, ...); ``None`` values are ignored.

        Returns:
            A recommender holding the model, the Feast client and an open KV store.

        Raises:
            FeatureRepoError: ``repo_path`` is not an ingested feature repo.
            ModelLoadError: ``model`` is not a usable causal LM with rotary positions and a
                tokenizer (or an item-lm ranker asked for in a dtype other than float32).
            ConfigError: an unknown key, a value of the wrong type or an invalid value (mode,
                policy, store URL, ...) in ``config``, ``config_file`` or the environment.
            NotEnoughCandidatesError: the ranker's template has fewer labels than ``candidates``.

        Example:
            >>> rec = RcRecommender.from_feature_store("feature_repo/", mode="rcllm",
            ...                                        store="fs:///tmp/rcllm-kv")
        """
        repo = Path(repo_path)
        retriever_file = repo / "data" / "retriever.npz"
        if not retriever_file.exists():
            raise FeatureRepoError(
                f"{repo} is not an ingested feature repo ({retriever_file} missing): "
                f"run `rcllm ingest --repo {repo}` first"
            )
        ranker = load_ranker(model if model is not None else repo / "data" / "ranker")
        return cls(
            FeatureClient(repo),
            Retriever.load(retriever_file),
            ranker,
            RecommenderConfig.resolve(config_file, **config),
        )

    def recommend(self, user_id: int, k: int = 10) -> Recommendation:
        """Top-``k`` items for one user.

        Args:
            user_id: a user of the feature store.
            k: items to return, 1 to ``config.candidates``.

        Returns:
            A :class:`Recommendation`, best item first, with timings and cache figures.

        Raises:
            InvalidRequestError: ``user_id`` is not an integer (bool, float, str) or is out of
                the 64-bit range, or ``k`` is not an integer.
            NotEnoughCandidatesError: ``k`` is outside 1..``candidates``, or the retriever found
                fewer unseen items than ``candidates``.
            UnknownUserError: the user is not in the feature store (``cold_start="raise"``).
            EmptyHistoryError: the user has no interactions (``cold_start="raise"``).
            FeatureRepoError: the feature store could not be read.

        Example:
            >>> r = rec.recommend(user_id=1, k=5)
            >>> r.item_ids, r.ttft_ms, r.cache.hits
        """
        return self.recommend_batch([user_id], k)[0]

    def recommend_batch(self, user_ids: list[int], k: int = 10) -> list[Recommendation]:
        """Top-``k`` items for each of several users.

        Users are served ``config.batch_size`` at a time: one Feast read for the items of
        their prompts, then one forward for all of them. With ``cold_start="popular"``,
        unknown users and users without history get the most popular items
        (``source="popularity"``).

        Args:
            user_ids: users of the feature store.
            k: items per user, 1 to ``config.candidates``.

        Returns:
            One :class:`Recommendation` per user, in the order of ``user_ids``.

        Raises:
            InvalidRequestError: ``user_ids`` is not a list of integers (a string, a bool, a
                float, an id out of the 64-bit range), or ``k`` is not an integer.
            NotEnoughCandidatesError: ``k`` is outside 1..``candidates``, or the retriever found
                fewer unseen items than ``candidates`` for a user.
            UnknownUserError: a user is not in the feature store (``cold_start="raise"``).
            EmptyHistoryError: a user has no interactions (``cold_start="raise"``).
            FeatureRepoError: the feature store could not be read.

        Example:
            >>> [r.item_ids[0] for r in rec.recommend_batch([1, 2, 3], k=5)]
        """
        started = time.perf_counter()
        user_ids = validation.user_ids(user_ids)
        k = self._check_k(k)
        histories = self.features.histories(user_ids)
        results: dict[int, Recommendation] = {}
        pending = []
        for slot, (user, found) in enumerate(zip(user_ids, histories, strict=False)):
            history = self._history_or_cold_start(user, found)
            if history is None:
                results[slot] = self._popular(user, k, started)
            else:
                pending.append((slot, user, history))
        for chunk in _chunks(pending, self.config.batch_size):
            for slot, rec in self._rank_chunk(chunk, k, started):
                results[slot] = rec
        return [results[i] for i in range(len(user_ids))]

    def _check_k(self, k: int) -> int:
        k = validation.count(k, "k")
        if not 1 <= k <= self.config.candidates:
            raise NotEnoughCandidatesError(
                f"k={k} but the ranker sees {self.config.candidates} candidates; "
                f"ask for 1 <= k <= {self.config.candidates} or raise `candidates`"
            )
        return k

    def _history_or_cold_start(self, user: int, found) -> list[int] | None:
        if found is None:
            if self.config.cold_start == "popular":
                return None
            raise UnknownUserError(
                f"user {user} is not in the feature store; ingest their interactions "
                "or set cold_start='popular'"
            )
        if not found[0]:
            if self.config.cold_start == "popular":
                return None
            raise EmptyHistoryError(
                f"user {user} has no interactions; set cold_start='popular' to serve them"
            )
        return found[0]

    def _popular(self, user: int, k: int, started: float) -> Recommendation:
        items = self.retriever.popular(k)
        return Recommendation(
            user,
            items,
            [float(k - r) for r in range(len(items))],
            [],
            0.0,
            _ms_since(started),
            source="popularity",
        )

    def _rank_chunk(self, chunk, k: int, started: float):
        prompts = self._prompts([history for _, _, history in chunk])
        t0 = time.perf_counter()
        scored = self._score(prompts, [self.label_ids[: len(p.candidate_ids)] for p in prompts])
        ttft = _ms_since(t0)
        if self.engine is not None:
            self.engine.flush()  # blocks computed here are stored before the result returns (counted in e2e)
        for (slot, user, _), prompt, (score, cache) in zip(chunk, prompts, scored, strict=False):
            order = torch.argsort(score, descending=True, stable=True)[:k].tolist()
            yield (
                slot,
                Recommendation(
                    user,
                    [prompt.candidate_ids[i] for i in order],
                    [float(score[i]) for i in order],
                    [prompt.labels[i] for i in order],
                    ttft,
                    _ms_since(started),
                    mode="full" if cache.fallback_full else self.config.mode,  # what ran
                    prompt_tokens=len(prompt.input_ids),
                    candidates=list(prompt.candidate_ids),
                    cache=cache,
                ),
            )

    def _score(
        self, prompts: list[RenderedPrompt], label_ids: list[list[int]]
    ) -> list[tuple[torch.Tensor, CacheStats]]:
        """Label logits per prompt and its cache figures, in the configured mode."""
        if self.config.mode == "full":
            scores = score_full(
                self.ranker.model,
                [p.input_ids for p in prompts],
                label_ids,
                self.ranker.tokenizer.pad_token_id,
            )
            return [(s, CacheStats()) for s in scores]
        scored = (
            self.engine.score(prompts, label_ids)
            if self.config.mode == "rcllm"
            else self.engine.score_prefix(prompts, label_ids)
        )
        return [(s.logits, s.cache) for s in scored]

    def _prompts(self, histories: list[list[int]]) -> list[RenderedPrompt]:
        """Retrieve candidates for each history, read all their item features in one Feast call, render."""
        template = self.ranker.template
        return self._render(
            [(history[-template.max_history :], self._candidates(history)) for history in histories]
        )

    def _render(self, plans: list[tuple[list[int], list[int]]]) -> list[RenderedPrompt]:
        """Prompts of ``(shown history, candidates)`` pairs; one Feast read for all their items."""
        info = self._items(list(dict.fromkeys(i for shown, cands in plans for i in shown + cands)))
        return [
            self.encoder.render([info[i] for i in shown], [info[i] for i in cands], self.ranker.fingerprint)
            for shown, cands in plans
        ]

    def _candidates(self, history: list[int]) -> list[int]:
        candidates = self.retriever.candidates(history, self.config.candidates)
        if len(candidates) < self.config.candidates:
            raise NotEnoughCandidatesError(
                f"the retriever found {len(candidates)} unseen items, "
                f"fewer than candidates={self.config.candidates}; lower it"
            )
        return candidates

    def _items(self, item_ids: list[int]) -> dict[int, ItemInfo]:
        cols = self.features.items(item_ids)
        return {
            i: ItemInfo(i, t or "", c or "", x or "")
            for i, t, c, x in zip(item_ids, cols["title"], cols["category"], cols["text"], strict=False)
        }


def _chunks(rows: list, size: int):
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0
