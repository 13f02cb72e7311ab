"""Training settings: a base shared by every recipe and one settings object per recipe.

Precedence, as for serving's ``RecommenderConfig``:

    defaults  <  YAML file (``config_file=``)  <  ``RCLLM_TRAIN_*`` environment  <  keyword arguments

Keys are the flat names :meth:`TrainConfig.record` writes (e.g. ``steps``, ``item_lm_window``,
``pretrain_worlds``); environment names are them upper-cased after ``RCLLM_TRAIN_``, so serving's
``RCLLM_*`` settings never reach training. No torch here: the CLI builds these without it.

Which recipe when:

* ``item-lm`` (default): an item-level LM over the history blocks with the label lookup compiled
  around it; the ranker reads the history. Its item features are chosen per catalog unless given
  (:func:`choose_item_features`): ``id`` (one learned embedding per item) when the training split has
  at least ``ID_FEATURES_MIN_INTERACTIONS_PER_ITEM`` interactions per item, otherwise ``content``
  (embeddings computed from categories, series/part in titles and popularity, plus pretraining on
  synthetic worlds), which transfers between items that are rarely seen.
* ``verbalizer``: every weight trained on the label loss. Kept for comparison: at CPU budgets it
  learns the retriever's order and a position prior, and gives every user nearly the same scores.
* ``finetune`` (chosen by ``base_model``): a pretrained checkpoint (LoRA adapters, or every weight)
  trained on the same label loss, on a GPU for real checkpoints (``pipelines/finetune/``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from rcllm_sdk.config import DEVICE_PATTERN, DTYPES, env_values, parse_bool, read_yaml_mapping
from rcllm_sdk.errors import ConfigError, TemplateError

RECIPES = ("verbalizer", "item-lm", "finetune")
SIZES = ("micro", "small", "base")
ITEM_FEATURES = ("auto", "id", "content")
HEAD_DIM = 32  # every item-LM size preset has heads of 32 dimensions: at most 32 candidates bind
ITEM_LM_HIDDEN = {"micro": 64, "small": 128, "base": 256}

# Catalogs with at least this many training interactions per item learn one embedding per item
# (MovieLens-1M: ~270, where id features beat the retriever by 10.6%); sparser ones (the synthetic
# default: ~48, the demo: ~35) compute item embeddings from content.
ID_FEATURES_MIN_INTERACTIONS_PER_ITEM = 100.0

RECIPE_DEFAULTS = {  # as measured: verbalizer on the synthetic default, item-lm on MovieLens-1M
    "verbalizer": {"batch_size": 32, "lr": 2e-3, "size": "small", "steps": 600},
    "item-lm": {"batch_size": 64, "lr": 3e-3},
    "finetune": {"batch_size": 4, "steps": 300},  # lr: FINETUNE_LR, per LoRA or full
}
FINETUNE_LR = {"lora": 2e-4, "full": 2e-5}  # the usual LoRA / full fine-tuning rates for 0.5-8B LLMs
DEFAULT_LORA = "8,16,0.05"  # rank, alpha, dropout
PLACEMENT = ("device", "dtype")  # shared with serving (rcllm evaluate/demo): other recipes ignore them
FEATURE_DEFAULTS = {  # item-lm, per item features
    # id: the MovieLens-1M setting (early stopping ended it at 1,700 of 2,000 steps).
    "id": {"size": "small", "steps": 2000, "patience": 3, "pretrain_worlds": 0},
    # content: micro fits first; with pretraining worlds the target is one batch in N + 1 and its
    # validation loss too noisy to stop on, so every step is trained (patience 0).
    "content": {"size": "micro", "steps": 2000, "patience": 0, "pretrain_worlds": 8},
}


@dataclass(slots=True)
class VerbalizerSettings:
    """``verbalizer`` recipe only. Block-aware training uses the attention structure ``rcllm`` serves
    with (user and item blocks see the system block and themselves)."""

    block_aware: bool = False
    block_aware_fraction: float = 1.0  # share of prompts with the block mask, the rest full attention
    history_lm_weight: float = 0.0  # auxiliary next-token loss over the history block
    shuffle_candidates: bool = False  # random candidate order per example

    def check(self) -> None:
        if not 0.0 < self.block_aware_fraction <= 1.0:
            raise ConfigError(f"block_aware_fraction must be in (0, 1], got {self.block_aware_fraction}")

    def used(self) -> list[str]:
        on = {
            "block_aware": self.block_aware,
            "shuffle_candidates": self.shuffle_candidates,
            "history_lm_weight": self.history_lm_weight,
        }
        return [name for name, value in on.items() if value]


@dataclass(slots=True)
class ItemLMSettings:
    """``item-lm`` recipe only."""

    window: int = 40  # history items per training window
    rank: int = 0  # dimensions of the next-item score carried into the label lookup (0: all)
    patience: int | None = None  # early-stopping checks without improvement (0: off; None: per features)
    features: str = "auto"  # id, content, or auto: chosen per catalog (choose_item_features)

    @property
    def stopping_patience(self) -> int:
        """``patience``, or the early-stopping default (3) when it was left to the recipe."""
        return 3 if self.patience is None else self.patience

    def check(self) -> None:
        if self.features not in ITEM_FEATURES:
            raise ConfigError(f"item_features must be one of {ITEM_FEATURES}, got {self.features!r}")
        if self.window < 1 or (self.patience is not None and self.patience < 0) or self.rank < 0:
            raise ConfigError("item_lm_window must be >= 1, item_lm_patience and item_lm_rank >= 0")


@dataclass(slots=True)
class ContentSettings:
    """``item-lm`` with content item features only."""

    pretrain_worlds: int | None = None  # synthetic worlds trained on beside the target (None: default)

    def check(self) -> None:
        if self.pretrain_worlds is not None and self.pretrain_worlds < 0:
            raise ConfigError(f"pretrain_worlds must be >= 0, got {self.pretrain_worlds}")


@dataclass(slots=True)
class FinetuneSettings:
    """``finetune`` recipe only: a pretrained checkpoint trained on the label loss. ``lora`` is
    ``"rank,alpha,dropout"``; ``full`` trains every weight instead; ``merge`` writes a plain merged
    folder instead of an adapter folder. ``device``/``dtype``: ``auto`` is CUDA with bf16 autocast
    where available, else CPU in float32."""

    base_model: str = ""  # a local Hugging Face folder or an MLflow model URI
    lora: str | None = None  # None: DEFAULT_LORA unless full
    full: bool = False
    merge: bool = False
    grad_accum: int = 1  # micro-batches of batch_size per optimiser step
    gradient_checkpointing: bool = False
    device: str = "auto"
    dtype: str = "auto"
    resume: bool = False  # continue from the checkpoint in the output folder
    checkpoint_every: int = 50  # optimiser steps between checkpoints (0: none)

    def lora_spec(self) -> tuple[int, float, float] | None:
        """``(rank, alpha, dropout)``, or None for full fine-tuning."""
        if self.full:
            return None
        parts = (self.lora or DEFAULT_LORA).split(",")
        try:
            rank, alpha, dropout = int(parts[0]), float(parts[1]), float(parts[2])
        except (ValueError, IndexError):
            rank = alpha = dropout = -1
        if len(parts) != 3 or rank < 1 or alpha <= 0 or not 0.0 <= dropout < 1.0:
            raise ConfigError(
                f"lora must be rank,alpha,dropout with rank >= 1, alpha > 0 and 0 <= dropout < 1 "
                f"(e.g. {DEFAULT_LORA}), got {self.lora!r}"
            )
        return rank, alpha, dropout

    def check(self) -> None:
        if self.full and (self.lora or self.merge):
            raise ConfigError("full trains every weight: lora and merge are for LoRA fine-tuning only")
        self.lora_spec()
        if not DEVICE_PATTERN.match(self.device) or self.dtype not in DTYPES:
            raise ConfigError(
                f"device must be auto, cpu, cuda or cuda:N and dtype one of {list(DTYPES)}, "
                f"got {self.device!r}, {self.dtype!r}"
            )
        if self.grad_accum < 1 or self.checkpoint_every < 0:
            raise ConfigError("grad_accum must be >= 1 and checkpoint_every >= 0")

    def used(self) -> list[str]:
        """The settings given that only the finetune recipe reads."""
        defaults = FinetuneSettings()
        return [
            f.name
            for f in fields(self)
            if f.name not in PLACEMENT and getattr(self, f.name) != getattr(defaults, f.name)
        ]


SECTIONS = {  # flat key -> (section, field)
    "block_aware": ("verbalizer", "block_aware"),
    "block_aware_fraction": ("verbalizer", "block_aware_fraction"),
    "history_lm_weight": ("verbalizer", "history_lm_weight"),
    "shuffle_candidates": ("verbalizer", "shuffle_candidates"),
    "item_lm_window": ("item_lm", "window"),
    "item_lm_rank": ("item_lm", "rank"),
    "item_lm_patience": ("item_lm", "patience"),
    "item_features": ("item_lm", "features"),
    "pretrain_worlds": ("content", "pretrain_worlds"),
    **{name: ("finetune", name) for name in FinetuneSettings.__dataclass_fields__},
}
SECTION_RECIPES = {  # which recipes read each section's keys (the finetune recipe trains block-aware too)
    "verbalizer": ("verbalizer",),
    "item_lm": ("item-lm",),
    "content": ("item-lm",),
    "finetune": ("finetune",),
}
FINETUNE_READS = ("block_aware", "block_aware_fraction")


@dataclass(slots=True)
class TrainConfig:
    """Ranker training settings shared by every recipe, with the recipes' own in ``verbalizer``,
    ``item_lm`` and ``content``. ``steps`` x ``batch_size`` prompts (item-lm: windows) are seen.
    Fields left None take the recipe's defaults; item-lm's depend on the catalog and are filled
    by :meth:`for_catalog`, which records the choice in ``choice``.

    Example:
        >>> TrainConfig.resolve(recipe="item-lm", item_features="content", steps=600).content.pretrain_worlds
    """

    recipe: str | None = None  # None: finetune when base_model is given, else item-lm
    size: str | None = None  # micro, small, base (None: the recipe's)
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.01
    warmup: int = 30
    candidates: int = 20
    max_examples: int = 20_000  # training examples drawn (user, position) at random
    vocab_size: int = 4000
    seed: int = 0
    threads: int = 0  # 0 = torch default
    item_text_words: int = 0  # description words in each item block (0: none)
    template: str | None = None  # a YAML prompt template (verbalizer, finetune; replaces item_text_words)
    verbalizer: VerbalizerSettings = field(default_factory=VerbalizerSettings)
    item_lm: ItemLMSettings = field(default_factory=ItemLMSettings)
    content: ContentSettings = field(default_factory=ContentSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    choice: str = ""  # how item-lm's catalog-dependent defaults were chosen (set by for_catalog)

    def __post_init__(self):
        if self.recipe is None:
            self.recipe = "finetune" if self.finetune.base_model else "item-lm"
        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe must be one of {list(RECIPES)}, got {self.recipe!r}")
        if self.size is not None and self.size not in SIZES:
            raise ConfigError(f"size must be one of {list(SIZES)}, got {self.size!r}")
        for name, value in RECIPE_DEFAULTS[self.recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.recipe == "finetune" and self.lr is None:
            self.lr = FINETUNE_LR["full" if self.finetune.full else "lora"]
        self.verbalizer.check()
        self.item_lm.check()
        self.content.check()
        self.finetune.check()
        self._check_finetune()
        if self.recipe == "item-lm":
            self._check_item_lm()
        elif self.item_lm.features not in ("auto", "id") or self.content.pretrain_worlds:
            raise ConfigError("item_features and pretrain_worlds are options of the item-lm recipe")
        if any(v is not None and v < 1 for v in (self.steps, self.batch_size)) or self.max_examples < 1:
            raise ConfigError("steps, batch_size and max_examples must be >= 1")
        if self.candidates < 2 or self.item_text_words < 0 or self.threads < 0:
            raise ConfigError("candidates must be >= 2, item_text_words and threads >= 0")
        if self.template:
            self._check_template()

    def _check_finetune(self) -> None:
        if self.recipe != "finetune":
            given = self.finetune.used()
            if given:
                raise ConfigError(
                    f"{', '.join(given)}: settings of the finetune recipe, which base_model selects "
                    f"(here the recipe is {self.recipe!r})"
                )
            return
        if not self.finetune.base_model:
            raise ConfigError("the finetune recipe needs base_model (a Hugging Face folder or MLflow URI)")
        if self.size is not None or self.verbalizer.history_lm_weight or self.verbalizer.shuffle_candidates:
            raise ConfigError(
                "size, history_lm_weight and shuffle_candidates are not finetune settings "
                "(the model is base_model)"
            )

    def _check_template(self) -> None:
        from rcllm_sdk.prompt.template_file import load_template

        if self.recipe == "item-lm":
            raise TemplateError(
                "the item-lm recipe builds its own compact prompt (item tokens, relation markers) and "
                "compiles its label lookup for it: a custom template needs --recipe verbalizer or "
                "--base-model (fine-tuning)"
            )
        load_template(self.template)  # a bad file fails here, before any training

    def _check_item_lm(self) -> None:
        unused = self.verbalizer.used()
        if unused:
            raise ConfigError(f"{', '.join(unused)}: only for the verbalizer recipe, not item-lm")
        if self.candidates > HEAD_DIM:
            raise ConfigError(f"item-lm binds at most {HEAD_DIM} candidates (one attention head)")
        if self.size and self.item_lm.rank > ITEM_LM_HIDDEN[self.size]:
            raise ConfigError(
                f"item_lm_rank must be between 0 (all dimensions) and the item LM's hidden size "
                f"{ITEM_LM_HIDDEN[self.size]}"
            )
        if self.item_lm.features == "id" and self.content.pretrain_worlds:
            raise ConfigError("pretrain_worlds needs item_features content (id embeddings do not transfer)")

    @property
    def features(self) -> str:
        """The item-lm item features (``auto`` until :meth:`for_catalog`)."""
        return self.item_lm.features

    def for_catalog(self, interactions: int, items: int) -> TrainConfig:
        """This config with every None default filled for a catalog of ``items`` items and
        ``interactions`` training interactions (item-lm: features by :func:`choose_item_features`)."""
        if self.recipe == "finetune":
            lora = None if self.finetune.full else self.finetune.lora or DEFAULT_LORA
            return replace(self, finetune=replace(self.finetune, lora=lora), choice=self._finetune_choice())
        if self.recipe != "item-lm":
            return replace(self, choice="verbalizer recipe")
        features, choice = self.item_lm.features, f"item_features={self.item_lm.features} (given)"
        if features == "auto":
            features, choice = choose_item_features(interactions, items)
        defaults = FEATURE_DEFAULTS[features]
        worlds = self.content.pretrain_worlds
        if features == "id" and worlds:  # only reachable with auto: id embeddings do not transfer
            choice, worlds = f"{choice}; pretrain_worlds={worlds} not used by id features", 0
        worlds = defaults["pretrain_worlds"] if worlds is None else worlds
        patience = self.item_lm.patience
        if patience is None:
            patience = defaults["patience"] if worlds else 3
        return replace(
            self,
            size=self.size or defaults["size"],
            steps=self.steps or defaults["steps"],
            item_lm=replace(self.item_lm, features=features, patience=patience),
            content=ContentSettings(worlds),
            choice=choice,
        )

    def _finetune_choice(self) -> str:
        spec = self.finetune.lora_spec()
        how = "every weight" if spec is None else "LoRA rank {}, alpha {:g}, dropout {:g}".format(*spec)
        return f"{how} of {self.finetune.base_model}"

    def record(self) -> dict:
        """Flat ``{key: value}`` of the settings this recipe uses (the training record's keys)."""
        base = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _SECTION_NAMES}
        for key, (section, name) in SECTIONS.items():
            read = self.recipe in SECTION_RECIPES[section]
            if read or (self.recipe == "finetune" and key in FINETUNE_READS):
                base[key] = getattr(getattr(self, section), name)
        return {**base, "choice": self.choice}

    @classmethod
    def resolve(cls, config_file: str | Path | None = None, **overrides) -> TrainConfig:
        """Merge defaults < YAML file < ``RCLLM_TRAIN_*`` environment < keyword arguments (None
        keyword values are ignored). Keys are flat (:meth:`record`'s); unknown keys are rejected."""
        values: dict = {}
        if config_file:
            values.update(read_yaml_mapping(Path(config_file), "training config"))
        values.update(env_values("RCLLM_TRAIN_", _KEYS))
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - set(_KEYS)
        if unknown:
            raise ConfigError(f"unknown training setting(s) {sorted(unknown)}; known: {sorted(_KEYS)}")
        return cls.from_flat({k: _coerce(k, v) for k, v in values.items()})

    @classmethod
    def from_flat(cls, values: dict) -> TrainConfig:
        """A config from flat keys (no environment or file)."""
        sections: dict[str, dict] = {"verbalizer": {}, "item_lm": {}, "content": {}, "finetune": {}}
        base = {}
        for key, value in values.items():
            if key in SECTIONS:
                section, name = SECTIONS[key]
                sections[section][name] = value
            else:
                base[key] = value
        return cls(
            **base,
            verbalizer=VerbalizerSettings(**sections["verbalizer"]),
            item_lm=ItemLMSettings(**sections["item_lm"]),
            content=ContentSettings(**sections["content"]),
            finetune=FinetuneSettings(**sections["finetune"]),
        )


_SECTION_NAMES = ("verbalizer", "item_lm", "content", "finetune", "choice")
_SETTINGS = {
    "verbalizer": VerbalizerSettings,
    "item_lm": ItemLMSettings,
    "content": ContentSettings,
    "finetune": FinetuneSettings,
}
_TYPES = {
    **{f.name: f.type for f in fields(TrainConfig) if f.name not in _SECTION_NAMES},
    **{
        key: next(f.type for f in fields(settings) if f.name == name)
        for key, (section, name) in SECTIONS.items()
        for settings in [_SETTINGS[section]]
    },
}
_KEYS = tuple(_TYPES)


def choose_item_features(interactions: int, items: int) -> tuple[str, str]:
    """``(features, why)``: ``id`` when the catalog has at least
    ``ID_FEATURES_MIN_INTERACTIONS_PER_ITEM`` training interactions per item, else ``content``."""
    per_item = interactions / max(items, 1)
    threshold = ID_FEATURES_MIN_INTERACTIONS_PER_ITEM
    features = "id" if per_item >= threshold else "content"
    sign = ">=" if features == "id" else "<"
    return (
        features,
        f"item_features={features}: {per_item:.1f} training interactions per item {sign} {threshold:g}",
    )


def _coerce(key: str, value):
    kind = _TYPES[key]
    if not isinstance(value, str):
        return value
    if "bool" in kind:
        return parse_bool(key, value)
    try:
        if "int" in kind:
            return int(value)
        if "float" in kind:
            return float(value)
    except ValueError as exc:
        raise ConfigError(f"training setting {key}={value!r} is not a valid {kind}") from exc
    return value
