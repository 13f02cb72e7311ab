"""Block-structured prompts: template, data types and the one encoder of the layout."""

from .encoder import PromptEncoder, cacheable_blocks, render
from .renderer import Block, ItemInfo, RenderedPrompt, block_hash, full_text
from .template import PromptTemplate, item_token
from .template_file import load_template, template_from_mapping

__all__ = [
    "Block",
    "ItemInfo",
    "PromptEncoder",
    "PromptTemplate",
    "RenderedPrompt",
    "block_hash",
    "cacheable_blocks",
    "full_text",
    "item_token",
    "load_template",
    "render",
    "template_from_mapping",
]
