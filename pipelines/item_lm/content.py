"""Item LMs whose item embeddings are computed from content (``--item-features content``).

The id item LM (:mod:`.fitting`) learns one embedding per item token; on a catalog with
few transitions per item it memorises before it generalises (measured on MovieLens-100K). Here an item's
input and output embeddings are functions of what the prompt shows about it (:class:`ContentFeatures`:
its categories, its series name and part number read off the title, and how often it was consumed),
so what the model learns transfers between items, and between catalogs: training may add
sequences of *other* catalogs whose items have no token at all (``pretrain``). History lines carry
relation markers (``PromptTemplate.relation_markers``).

After training, the target catalog's content embeddings are written into the item tokens' rows
of a plain, untied ``LlamaForCausalLM``, which the rest of the item-lm recipe (readout, compiled
lookup) uses unchanged.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from rcllm_sdk.errors import ConfigError
from rcllm_sdk.model.scoring import pad_batch
from rcllm_sdk.prompt import ItemInfo
from rcllm_sdk.prompt.template import NEXT_MARKER, RELATION_MARKERS, PromptTemplate, relation, series_part

SERIES_CODE_DIM = 256  # a fixed random code per series name: equal names match, others are near orthogonal
MAX_PART = 8  # part numbers above share one embedding
CATEGORY_BUCKETS = 4096  # category names are hashed: catalogs share embeddings for equal names
POPULARITY_BUCKETS = 10


@dataclass(slots=True)
class ContentFeatures:
    """Per item (one row each): hashed category names (``CATEGORY_BUCKETS`` pads), part number,
    series code, popularity bucket (tenths of log1p(count) over its maximum) and log1p(count)."""

    categories: torch.Tensor  # [N, G] long
    part: torch.Tensor  # [N] long
    series: torch.Tensor  # [N, SERIES_CODE_DIM] float
    popularity: torch.Tensor  # [N] long
    log_count: torch.Tensor  # [N, 1] float


def content_features(items: list[ItemInfo], counts: np.ndarray) -> ContentFeatures:
    """Features of ``items`` (``counts``: how often each was consumed in the training sequences).
    Categories are split on "|" (MovieLens genres)."""
    names = [[c.strip() for c in item.category.split("|") if c.strip()] or [""] for item in items]
    width = max(map(len, names))
    categories = torch.full((len(items), width), CATEGORY_BUCKETS, dtype=torch.long)
    for row, cats in enumerate(names):
        categories[row, : len(cats)] = torch.tensor([zlib.crc32(c.encode()) % CATEGORY_BUCKETS for c in cats])
    series, part = zip(*(series_part(item.title) for item in items), strict=False)
    log_count = np.log1p(np.asarray(counts, dtype=np.float64))
    bucket = np.minimum(
        (POPULARITY_BUCKETS * log_count / max(log_count.max(), 1e-9)).astype(int), POPULARITY_BUCKETS - 1
    )
    return ContentFeatures(
        categories,
        torch.tensor(part).clamp(max=MAX_PART),
        torch.stack([_series_code(s) for s in series]),
        torch.tensor(bucket),
        torch.tensor(log_count, dtype=torch.float32)[:, None],
    )


@functools.lru_cache(maxsize=65536)
def _series_code(name: str) -> torch.Tensor:
    code = (
        np.random.default_rng(zlib.crc32(name.encode())).standard_normal(SERIES_CODE_DIM)
        / SERIES_CODE_DIM**0.5
    )
    return torch.tensor(code, dtype=torch.float32)


class ContentEmbeddings(torch.nn.Module):
    """Input and output embeddings of items from their :class:`ContentFeatures`: each a sum of a mean
    category embedding, part and popularity embeddings, a linear map of the series code and a learned
    multiple of log1p(count). No parameter belongs to one item."""

    def __init__(self, hidden: int):
        super().__init__()
        self.sides = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                {
                    "category": torch.nn.Embedding(
                        CATEGORY_BUCKETS + 1, hidden, padding_idx=CATEGORY_BUCKETS
                    ),
                    "part": torch.nn.Embedding(MAX_PART + 1, hidden),
                    "popularity": torch.nn.Embedding(POPULARITY_BUCKETS, hidden),
                    "series": torch.nn.Linear(SERIES_CODE_DIM, hidden, bias=False),
                    "log_count": torch.nn.Linear(1, hidden, bias=False),
                }
            )
            for _ in range(2)
        )
        for side in self.sides:
            for name in ("category", "part", "popularity"):
                torch.nn.init.normal_(side[name].weight, std=0.1)
            torch.nn.init.normal_(side["log_count"].weight, std=0.02)  # log counts reach ~8: start small
            with torch.no_grad():
                side["category"].weight[CATEGORY_BUCKETS] = 0

    def forward(self, f: ContentFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, outputs)``, ``[N, hidden]`` each."""
        valid = (f.categories < CATEGORY_BUCKETS).sum(1, keepdim=True).clamp(min=1)
        return tuple(
            side["category"](f.categories).sum(1) / valid
            + side["part"](f.part)
            + side["popularity"](f.popularity)
            + side["series"](f.series)
            + side["log_count"](f.log_count)
            for side in self.sides
        )


@dataclass(slots=True)
class Catalog:
    """One catalog's training data: item rows (``ItemInfo``), sequences of row indices, features."""

    items: list[ItemInfo]
    sequences: list[list[int]]
    features: ContentFeatures

    @classmethod
    def from_sequences(cls, items: list[ItemInfo], sequences: list[list[int]]) -> Catalog:
        counts = np.bincount(
            np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences] or [np.zeros(0, np.int64)]),
            minlength=len(items),
        )
        return cls(items, sequences, content_features(items, counts))


class ContentWindows:
    """Token ids of user-block windows in which an item is ``-(row + 1)`` (its embedding comes from
    content): system block, header, one line per item (relation marker but on the first line, item,
    newline), the next-item marker and the next item. For the catalog the tokenizer has item tokens
    for, replacing each ``-(row + 1)`` by the row's item token gives exactly the rendered user block
    (tested)."""

    def __init__(self, template: PromptTemplate, tokenizer):
        if not (template.relation_markers and not template.titles and not template.categories):
            raise ConfigError("content item LMs need the compact item-lm template with relation markers")
        ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.template, self.tokenizer = template, tokenizer
        self._head = ids(template.system) + ids(template.history_header)
        self._newline = ids("\n")
        self._marker = {name: tokenizer.convert_tokens_to_ids(name) for name in RELATION_MARKERS}
        self.relation_ids = torch.tensor(list(self._marker.values()))
        self.marker_id = tokenizer.convert_tokens_to_ids(NEXT_MARKER)

    def encode(self, catalog: Catalog, rows: list[int], next_row: int) -> list[int]:
        tokens, items = list(self._head), catalog.items
        for n, row in enumerate(rows):
            if n:
                a, b = items[rows[n - 1]], items[row]
                marker = relation(a.title, a.category, b.title, b.category)
                tokens += [self._marker[marker]] if marker else []
            tokens += [-(row + 1)] + self._newline
        return tokens + [self.marker_id, -(next_row + 1)]


class ContentItemLM(torch.nn.Module):
    """An untied Llama whose item rows come from :class:`ContentEmbeddings`."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.llama = LlamaForCausalLM(config)
        self.content = ContentEmbeddings(config.hidden_size)

    def loss(
        self, catalog: Catalog, windows: list[list[int]], pad_id: int, relation_ids: torch.Tensor
    ) -> torch.Tensor:
        """Cross-entropy of every next item in ``windows`` over the catalog's items not yet in it."""
        return torch.nn.functional.cross_entropy(
            *self.next_item_logits(catalog, windows, pad_id, relation_ids)
        )

    def next_item_logits(
        self, catalog: Catalog, windows: list[list[int]], pad_id: int, relation_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [T, items], targets [T])`` of every item in ``windows`` (in window order), predicted
        at the token before its line: its own relation marker says how it follows, so it is not seen.
        Items already in the window are masked."""
        inputs, outputs = self.content(catalog.features)
        ids, mask, _ = pad_batch(windows, pad_id)
        is_item = ids < 0
        rows = (-ids - 1).clamp(min=0)
        text = self.llama.model.embed_tokens(ids.clamp(min=0))
        embeds = torch.where(is_item[..., None], inputs[rows], text)
        hidden = self.llama.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        b, t = torch.nonzero(is_item[:, 1:] & (mask[:, 1:] > 0), as_tuple=True)  # item at t + 1
        targets = rows[b, t + 1]
        before = t - torch.isin(ids[b, t], relation_ids).long()  # skip the item's own marker
        logits = (hidden[b, before] @ outputs.T).masked_fill(
            _earlier_items(b, targets, logits_width=len(outputs)), -1e4
        )
        return logits, targets

    @torch.no_grad()
    def materialize(self, catalog: Catalog, item_token_ids: torch.Tensor) -> LlamaForCausalLM:
        """The Llama with ``catalog``'s content embeddings in the item tokens' rows (row n of the
        catalog -> ``item_token_ids[n]``)."""
        inputs, outputs = self.content(catalog.features)
        self.llama.model.embed_tokens.weight[item_token_ids] = inputs
        self.llama.lm_head.weight[item_token_ids] = outputs
        return self.llama


def synthetic_catalogs(count: int, first_seed: int = 1000) -> list[Catalog]:
    """``count`` worlds of the package's synthetic generator (default sizes, seeds ``first_seed``,
    ``first_seed + 1``, ...): other items, titles and users, the same mechanism. Every user's whole
    sequence is training data (none of it is evaluated)."""

    from rcllm_sdk.data.synthetic import SyntheticConfig, generate

    catalogs = []
    for seed in tqdm(
        range(first_seed, first_seed + count), desc="generate pretraining worlds", disable=count < 2
    ):
        interactions, items = generate(SyntheticConfig(seed=seed))
        row = {int(i): n for n, i in enumerate(items["item_id"])}
        infos = [ItemInfo(*r) for r in items.select("item_id", "title", "category", "text").iter_rows()]
        sequences = (
            interactions.sort("user_id", "timestamp").group_by("user_id", maintain_order=True).agg("item_id")
        )
        catalogs.append(Catalog.from_sequences(infos, [[row[i] for i in s] for s in sequences["item_id"]]))
    return catalogs


def _earlier_items(window: torch.Tensor, targets: torch.Tensor, logits_width: int) -> torch.Tensor:
    """``[len(targets), logits_width]``: True at the items that came before each target in its window
    (``window[n]``: the window of target n; targets grouped by window in order, as ``torch.nonzero``
    lists them)."""
    seen = torch.zeros(len(targets), logits_width, dtype=torch.bool)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(window).cumsum(0)])
    for start, end in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=False):
        later, earlier = torch.tril_indices(end - start, end - start, -1)
        seen[start + later, targets[start + earlier]] = True
    return seen


def train_content_item_lm(
    target: Catalog,
    pretrain: list[Catalog],
    windows: ContentWindows,
    config,
    model_config: LlamaConfig,
    progress: bool = True,
):
    """Train a :class:`ContentItemLM` on ``config.steps`` batches, each of ``config.batch_size`` windows
    of one catalog drawn uniformly from ``[target, *pretrain]``. Early stopping as for id item LMs,
    on held-out target sequences. Returns ``(ContentItemLM, losses, record)``."""
    from .fitting import fit_item_lm, mean_loss
    from .windows import sample_windows, validation_split

    torch.manual_seed(config.seed)
    model = ContentItemLM(model_config)
    pad_id, relation_ids = model_config.pad_token_id, windows.relation_ids
    kept, validation = validation_split(target.sequences, functools.partial(windows.encode, target), config)
    catalogs = [Catalog(target.items, kept, target.features), *pretrain]
    rng = np.random.default_rng(config.seed)

    def next_loss() -> torch.Tensor:
        catalog = catalogs[int(rng.integers(len(catalogs)))]
        batch = sample_windows(catalog.sequences, functools.partial(windows.encode, catalog), config, rng)
        return model.loss(catalog, batch, pad_id, relation_ids)

    def validation_loss() -> float:
        return mean_loss(model, lambda part: model.loss(target, part, pad_id, relation_ids), validation)

    return fit_item_lm(
        model, next_loss, validation_loss if validation else None, config, "content item LM", progress
    )
