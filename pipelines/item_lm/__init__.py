"""Item-LM rankers: a sequence model over the user block, compiled into the label lookup.

Gradient descent does not find a ranker's binding circuit (label -> item -> query) from scratch
on CPU budgets (trained so, it learns the retriever's order and a position prior), while an
item-level language model over the same histories beats the retriever on MovieLens-1M. This
recipe therefore (modules: ``windows``, ``fitting``, ``content``, ``readout``, ``layout``,
``compile``, ``recipe``)

1. trains a small Llama as a language model over the prompt's own user blocks (next item after
   every history line and after ``NEXT_MARKER``, which ends the block; :func:`train_item_lm`);
2. fits the position prior and the weight of the item LM's score with the verbalizer objective
   on the same cross-fitted examples ``rcllm train`` uses (K + 1 numbers; :func:`fit_readout`);
3. *compiles* the label lookup around the trained layers as two more Llama layers with
   constructed weights (:func:`compile_ranker`; how, in :mod:`.compile`). The result is a plain
   ``LlamaForCausalLM`` on which every serving mode runs.
"""

from .compile import compile_ranker, compiled_agreement
from .fitting import ITEM_LM_SHAPES, fit_item_lm, item_lm_config, mean_loss, train_item_lm
from .readout import candidate_scores, fit_readout, marker_predictions, score_basis
from .recipe import train_item_lm_ranker
from .windows import UserBlockWindows, item_lm_template, sample_windows, validation_split

__all__ = [
    "ITEM_LM_SHAPES",
    "UserBlockWindows",
    "candidate_scores",
    "compile_ranker",
    "compiled_agreement",
    "fit_item_lm",
    "fit_readout",
    "item_lm_config",
    "item_lm_template",
    "marker_predictions",
    "mean_loss",
    "sample_windows",
    "score_basis",
    "train_item_lm",
    "train_item_lm_ranker",
    "validation_split",
]
