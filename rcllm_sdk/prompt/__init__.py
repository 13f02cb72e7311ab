"""Block-structured prompts: template and pure renderer."""

from .renderer import Block, ItemInfo, RenderedPrompt, block_hash, full_text, render
from .template import PromptTemplate, item_token

__all__ = [
    "Block",
    "ItemInfo",
    "PromptTemplate",
    "RenderedPrompt",
    "block_hash",
    "full_text",
    "item_token",
    "render",
]
