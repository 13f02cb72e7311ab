"""``RcRecommender``: the facade. Features -> candidates -> blocks -> forward -> ranking."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from .config import RecommenderConfig
from .errors import FeatureRepoError, NotEnoughCandidatesError, RcLLMError
from .features import FeatureClient
from .model.device import check_placement
from .model.ranker import Ranker, load_ranker
from .model.scoring import score_full
from .model.tokenizer import label_token_ids
from .model.watch import WeightsWatch
from .model_follow import AliasFollower, SwapLock
from .prompt import ItemInfo, PromptEncoder, RenderedPrompt
from .prompt.check import warn_if_blocks_differ
from .prompt.template_file import with_template
from .request_plan import RequestPlan, plan_requests, retrieve
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
        self.swap_lock, self.follower, self.model_source = SwapLock(), None, None  # see reload()
        self.weights_watch = WeightsWatch()  # warns when the served model's files change on disk
        check_placement(ranker.model, config.device, config.dtype, ranker.training.get("recipe"))
        if config.threads:
            torch.set_num_threads(config.threads)
        labels = ranker.template.labels[: config.candidates]
        if len(labels) < config.candidates:
            raise NotEnoughCandidatesError(
                f"the template has {len(labels)} labels; set candidates <= {len(labels)}"
            )
        self.label_ids = label_token_ids(ranker.tokenizer, labels, ranker.template.label_format)
        self.encoder = PromptEncoder(ranker.template, ranker.tokenizer)
        warn_if_blocks_differ(self.encoder, ranker.fingerprint)
        self.engine = None
        if config.mode != "full":
            from .cache import open_store  # lazy: LMCache is heavy and only needed when caching

            self.engine = BlockEngine(
                ranker,
                open_store(config.store, namespace=ranker.fingerprint, tier_blocks=config.tier_blocks),
                config.policy,
                config.attention,
                config.prefix_chunk,
                guard=config.guard,
                **({"hot_block_bytes": 0} if config.tier_blocks else {}),  # the tier is the only local copy
            )
            if config.mode == "rcllm" and config.guard:
                self.engine.calibrate_guard()  # here, not inside the first request's latency

    @property
    def model_version(self) -> str:
        """The ranker's registry version where it came from the MLflow registry, else its fingerprint."""
        return self.ranker.version or self.ranker.fingerprint

    def with_config(self, **overrides) -> RcRecommender:
        """A recommender sharing this one's features, retriever and ranker under changed
        settings, e.g. ``rec.with_config(mode="prefix")``; close it when done."""
        return RcRecommender(self.features, self.retriever, self.ranker, replace(self.config, **overrides))

    def reload(self) -> bool:
        """Load the model this recommender was opened with as it is now (an alias's current version,
        the folder ``rcllm train`` last pointed ``<repo>/data/ranker`` at) and swap it in between
        requests; True when the model changed (:mod:`rcllm_sdk.model_follow`)."""
        from .model_follow import reload

        return reload(self)

    def close(self) -> None:
        """Release the KV store (remote connections, LMCache workers)."""
        if self.follower is not None:
            self.follower.stop()
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
        template: str | Path | None = None,
        follow_alias: bool = False,
        follow_interval_s: float = 60.0,
        **config,
    ) -> RcRecommender:
        """Open an ingested feature repo and a ranker.

        Settings resolve as defaults < ``config_file`` < ``RCLLM_*`` environment < ``config``.

        Args:
            repo_path: a feature repo filled by ``rcllm ingest``.
            model: a local Hugging Face folder, a PEFT adapter folder (merged into its base) or
                an MLflow URI of either (``runs:/<run_id>/model``, ``models:/<name>@<alias>``);
                defaults to ``<repo>/data/ranker``, where ``rcllm train`` saves.
            config_file: a YAML file of :class:`RecommenderConfig` fields.
            template: a YAML prompt template (docs/configuration.md) served instead of the one
                saved with the model (``TemplateError`` when invalid or for an item-lm ranker).
            follow_alias: poll ``model`` (e.g. ``models:/rcllm-ranker@champion``) every
                ``follow_interval_s`` seconds and swap in the version it names (:meth:`reload`).
            **config: :class:`RecommenderConfig` fields (``mode``, ``policy``, ``store``,
                ``candidates``, ...); ``None`` values are ignored.

        Returns:
            A recommender holding the model, the Feast client and an open KV store.

        Raises:
            FeatureRepoError: ``repo_path`` is not an ingested feature repo.
            ModelLoadError: ``model`` is not a usable causal LM with rotary positions and a
                tokenizer; ``UnsupportedModelError`` (a subclass) names what is supported, and
                ``UnsupportedDtypeError`` an item-lm ranker asked for in a dtype other than float32.
            DeviceUnavailableError: ``device`` is CUDA on a machine without it.
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
        settings = RecommenderConfig.resolve(config_file, **config)
        source = model if model is not None else repo / "data" / "ranker"
        if str(source).startswith(("models:/", "runs:/")):
            from .tracking import configure

            configure(repo)  # MLFLOW_TRACKING_URI, else the repo's own store
        ranker = load_ranker(
            source,
            dtype=settings.dtype,
            device=settings.device,
        )
        ranker = with_template(ranker, template)
        rec = cls(FeatureClient(repo), Retriever.load(retriever_file), ranker, settings)
        rec.model_source = None if template else source  # a template override is not reloaded
        rec.follower = AliasFollower(rec, follow_interval_s) if follow_alias else None
        return rec

    @classmethod
    def from_frames(
        cls, users, items, model, template=None, config_file=None, retriever=None, **config
    ) -> RcRecommender:
        """Serve from data held in memory, without Feast, polars or LMCache (notebooks, tests).

        ``users``: each user's item ids oldest first, or interaction rows; ``items``: item features
        (dicts or a pandas/polars DataFrame: :mod:`rcllm_sdk.features.memory`); ``model``: as in
        :meth:`from_feature_store`, or a loaded ``Ranker``; ``retriever``: a ``RetrieverConfig``
        or a fitted ``Retriever`` (default: fitted on ``users``). The store defaults to ``memory://``.
        """
        from .features.memory import in_memory

        parts = in_memory(users, items, model, template, config_file, config, retriever)
        return cls(*parts)

    def recommend(self, user_id: int, k: int = 10, candidates: list[int] | None = None) -> Recommendation:
        """Top-``k`` items for one user.

        Args:
            user_id: a user of the feature store.
            k: items to return, 1 to ``config.candidates``.
            candidates: item ids to rank instead of the retriever's (1 to ``config.candidates``
                distinct catalog items, at least ``k``).

        Returns:
            A :class:`Recommendation`, best item first, with timings and cache figures.

        Raises:
            InvalidRequestError: ``user_id`` is not an integer (bool, float, str) or is out of
                the 64-bit range, ``k`` is not an integer, or ``candidates`` is not a list of
                distinct integer item ids.
            NotEnoughCandidatesError: ``k`` is outside 1..``candidates``, or the retriever found
                fewer unseen items than ``candidates`` (or fewer than ``k`` were given).
            UnknownItemError: a given candidate is not in the catalog.
            UnknownUserError: the user is not in the feature store (``cold_start="raise"``).
            EmptyHistoryError: the user has no interactions (``cold_start="raise"``).
            FeatureRepoError: the feature store could not be read.

        Example:
            >>> r = rec.recommend(user_id=1, k=5)
            >>> r.item_ids, r.ttft_ms, r.cache.hits
        """
        return self.recommend_batch([user_id], k, None if candidates is None else [candidates])[0]

    async def arecommend(
        self, user_id: int, k: int = 10, candidates: list[int] | None = None
    ) -> Recommendation:
        """:meth:`recommend` for asyncio callers: runs in a worker thread, the event loop stays
        free (``rcllm_sdk.serving.scheduler.Scheduler`` batches concurrent callers)."""
        import asyncio

        return await asyncio.to_thread(self.recommend, user_id, k, candidates)

    def recommend_batch(
        self, user_ids: list[int], k: int = 10, candidates: list[list[int] | None] | None = None
    ) -> list[Recommendation]:
        """Top-``k`` items for each of several users.

        Users are served ``config.batch_size`` at a time: one Feast read for the items of
        their prompts, then one forward for all of them. With ``cold_start="popular"``,
        unknown users and users without history get the most popular items
        (``source="popularity"``).

        Args:
            user_ids: users of the feature store.
            k: items per user, 1 to ``config.candidates``.
            candidates: per user, item ids to rank instead of the retriever's, or ``None``
                (the retriever's); as in :meth:`recommend`.

        Returns:
            One :class:`Recommendation` per user, in the order of ``user_ids``.

        Raises:
            InvalidRequestError: ``user_ids`` is not a list of integers (a string, a bool, a
                float, an id out of the 64-bit range), ``k`` is not an integer, or
                ``candidates`` is malformed.
            UnknownItemError: a given candidate is not in the catalog.
            NotEnoughCandidatesError: ``k`` is outside 1..``candidates``, or the retriever found
                fewer unseen items than ``candidates`` for a user.
            UnknownUserError: a user is not in the feature store (``cold_start="raise"``).
            EmptyHistoryError: a user has no interactions (``cold_start="raise"``).
            FeatureRepoError: the feature store could not be read.

        Example:
            >>> [r.item_ids[0] for r in rec.recommend_batch([1, 2, 3], k=5)]
        """
        with self.swap_lock.reading():  # a model swap waits for this batch: one version per request
            return self._serve_batch(user_ids, k, candidates)

    def _serve_batch(self, user_ids, k, candidates) -> list[Recommendation]:
        started = time.perf_counter()
        plans = self.plan(user_ids, k, candidates)
        refused = next((p for p in plans if isinstance(p, Exception)), None)
        if refused is not None:
            raise refused
        return self._serve_plans(plans, started)

    def plan(self, user_ids: list[int], k=10, candidates=None) -> list[RequestPlan | RcLLMError]:
        """Plan requests without running them: one Feast read of the histories, then per user a
        :class:`~rcllm_sdk.request_plan.RequestPlan` (history, candidates, ``blocks``) or the
        named error that refuses that user alone. ``k``: one count, or one per user; the rest as in
        :meth:`recommend_batch`. Serve plans with :meth:`recommend_planned`."""
        return plan_requests(self, user_ids, k, candidates)

    def recommend_planned(self, plans: list[RequestPlan]) -> list[Recommendation]:
        """One :class:`Recommendation` per plan of :meth:`plan` (each cut to its own ``k``),
        without reading the histories again."""
        with self.swap_lock.reading():
            return self._serve_plans(plans, time.perf_counter())

    def _serve_plans(self, plans: list[RequestPlan], started: float) -> list[Recommendation]:
        self.weights_watch.check(self.ranker)
        results: dict[int, Recommendation] = {}
        pending = []
        for slot, plan in enumerate(plans):
            if plan.history is None:
                results[slot] = self._popular(plan.user_id, plan.k, started)
            else:
                pending.append((slot, plan))
        for chunk in _chunks(pending, self.config.batch_size):
            for slot, rec in self._rank_chunk([plan for _, plan in chunk], started):
                results[chunk[slot][0]] = rec
        return [results[i] for i in range(len(plans))]

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
            model_version=self.model_version,
        )

    def _rank_chunk(self, plans: list[RequestPlan], started: float):
        prompts = self._render_plans(plans)
        t0 = time.perf_counter()
        scored = self._score(prompts, [self.label_ids[: len(p.candidate_ids)] for p in prompts])
        ttft = _ms_since(t0)
        if self.engine is not None:
            self.engine.flush()  # blocks computed here are stored before the result returns (counted in e2e)
        for slot, (plan, prompt, (score, cache)) in enumerate(zip(plans, prompts, scored, strict=True)):
            order = torch.argsort(score, descending=True, stable=True)[: plan.k].tolist()
            yield (
                slot,
                Recommendation(
                    plan.user_id,
                    [prompt.candidate_ids[i] for i in order],
                    [float(score[i]) for i in order],
                    [prompt.labels[i] for i in order],
                    ttft,
                    _ms_since(started),
                    mode="full" if cache.fallback_full else self.config.mode,  # what ran
                    prompt_tokens=len(prompt.input_ids),
                    candidates=list(prompt.candidate_ids),
                    cache=cache,
                    model_version=self.model_version,
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
            return [(s.cpu(), CacheStats()) for s in scores]
        scored = (
            self.engine.score(prompts, label_ids)
            if self.config.mode == "rcllm"
            else self.engine.score_prefix(prompts, label_ids)
        )
        return [(s.logits, s.cache) for s in scored]

    def _prompts(self, histories: list[list[int]]) -> list[RenderedPrompt]:
        """Retrieve candidates for each history, read all their item features in one Feast call, render."""
        keep = self.ranker.template.max_history
        return self._render([(history[-keep:], self._candidates(history)) for history in histories])

    def _render_plans(self, plans: list[RequestPlan]) -> list[RenderedPrompt]:
        """Each plan's prompt: its shown history (the template's last ``max_history``) and candidates."""
        keep = self.ranker.template.max_history
        return self._render([(plan.history[-keep:], plan.candidates) for plan in plans])

    def _render(self, plans: list[tuple[list[int], list[int]]]) -> list[RenderedPrompt]:
        """Prompts of ``(shown history, candidates)`` pairs; one Feast read for all their items."""
        info = self._items(list(dict.fromkeys(i for shown, cands in plans for i in shown + cands)))
        return [
            self.encoder.render([info[i] for i in shown], [info[i] for i in cands], self.ranker.fingerprint)
            for shown, cands in plans
        ]

    def _candidates(self, history: list[int]) -> list[int]:
        return retrieve(self.retriever, history, self.config.candidates)

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
