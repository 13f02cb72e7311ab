"""Tiny random Hugging Face checkpoints built offline, as a user would bring their own.

``make_checkpoint(folder, family, tokenizer)`` writes a ``save_pretrained`` folder (config,
safetensors, tokenizer files) of a 2-layer random causal LM of one of the rotary families, with
a tokenizer trained here by the ``tokenizers`` library:

- ``"bpe"``: byte-level BPE, Qwen / Llama-3 style (``<|endoftext|>`` as EOS, no BOS, ChatML
  chat template).
- ``"sentencepiece"``: SentencePiece style, Llama-2 / Mistral style (Metaspace pre-tokenizer with
  ``▁`` prepended to the first word, a BPE model, ``<s>`` BOS added by the post-processor,
  ``[INST]`` chat template).

``pad_token=False`` leaves the tokenizer without a pad token (Llama-2/3, Mistral base).
``rope_scaling`` sets the config's RoPE parameters (e.g. ``{"rope_type": "llama3", ...}``).
Tests only: nothing here is downloaded.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from rcllm_sdk.prompt.template import LETTERS, PromptTemplate

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
TOKENIZERS = ("bpe", "sentencepiece")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INST = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
)

# Shape of every tiny checkpoint: small enough that a test serves it in seconds.
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def default_texts(items=None) -> list[str]:
    """Training text: the default template's texts, label lines in common formats, and the
    titles and categories of ``items`` (a frame with ``title``/``category`` columns) if given."""
    template = PromptTemplate(item_tokens=False)
    labels = LETTERS[:26] + [str(n) for n in range(1, 21)]
    label_lines = [f"{fmt.format(x)}\n" for x in labels for fmt in ("{}", "({}) ", "{}. ", "{}) ")]
    texts = [template.system, template.history_header, template.query, "Answer: A", *label_lines]
    if items is not None:
        texts += [f"{t} ({c})\n" for t, c in zip(items["title"], items["category"], strict=True)]
    return texts * 20


def train_bpe_tokenizer(texts: Iterable[str], pad_token: bool = True, vocab_size: int = 800):
    """Byte-level BPE (GPT-2 / Qwen / Llama-3 style): every byte is a token, so any text encodes."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(texts), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>" if pad_token else None,
        additional_special_tokens=specials[1:],
    )
    tok.chat_template = CHATML
    return tok


def train_sentencepiece_tokenizer(texts: Iterable[str], pad_token: bool = True, vocab_size: int = 800):
    """SentencePiece style (Llama-2 / Mistral): spaces become ``▁``, one ``▁`` before the first
    word, a BPE model over characters, and ``<s>`` added in front by the post-processor."""
    core = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    core.normalizer = normalizers.NFKC()
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"] + (["<pad>"] if pad_token else [])
    alphabet = list(string.ascii_letters + string.digits + string.punctuation) + ["\n", "▁"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    core.train_from_iterator(list(texts), trainer=trainer)
    bos = core.token_to_id("<s>")
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>" if pad_token else None,
    )
    tok.chat_template = INST
    return tok


def make_tokenizer(kind: str = "bpe", pad_token: bool = True, texts: Iterable[str] | None = None):
    """A ``PreTrainedTokenizerFast`` of ``kind`` (``"bpe"`` | ``"sentencepiece"``) trained on ``texts``."""
    texts = list(texts) if texts is not None else default_texts()
    if kind == "bpe":
        return train_bpe_tokenizer(texts, pad_token)
    if kind == "sentencepiece":
        return train_sentencepiece_tokenizer(texts, pad_token)
    raise KeyError(f"tokenizer kind {kind!r}: one of {TOKENIZERS}")


def make_config(family: str, tokenizer, rope_scaling: dict | None = None, **overrides):
    """The tiny config of ``family`` for ``tokenizer`` (sliding window off; ``rope_scaling``
    merged into the RoPE parameters)."""
    extra = {"sliding_window": None} if family == "mistral" else {}
    extra |= {"use_sliding_window": False} if family in ("qwen2", "qwen3") else {}
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **(SHAPE | extra | overrides),
    )
    if rope_scaling:
        config.rope_parameters = {**config.rope_parameters, **rope_scaling}
    return config


def make_model(config, seed: int = 0):
    """A random model of ``config``, in eval mode, with weights large enough that the label
    logits differ clearly between candidates."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def make_checkpoint(
    folder: str | Path,
    family: str = "qwen2",
    tokenizer: str = "bpe",
    pad_token: bool = True,
    rope_scaling: dict | None = None,
    texts: Iterable[str] | None = None,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """Write a tiny random ``family`` checkpoint with a ``tokenizer``-kind tokenizer to ``folder``.

    Example:
        >>> make_checkpoint(tmp_path / "llama", "llama", "sentencepiece", pad_token=False)
    """
    if family not in FAMILIES:
        raise KeyError(f"family {family!r}: one of {FAMILIES}")
    folder = Path(folder)
    tok = make_tokenizer(tokenizer, pad_token, texts)
    model = make_model(make_config(family, tok, rope_scaling, **config_overrides), seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
