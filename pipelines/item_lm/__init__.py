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
   constructed weights (:func:`compile_ranker`). Extra hidden dimensions (:class:`Layout`) carry it:

   - layer L, attention: every token after the marker copies the marker's next-item prediction
     (a rank-R projection: PRED); each candidate's item token copies its label from two tokens
     back (LAB), at a magnitude that dominates its norm, so RMSNorm scales every candidate alike;
     every other token rests on the system block's first token (a sink that cached blocks see too).
   - layer L, MLP: SCORE = PRED . KEY, the item LM's logit of the token's own item (KEY, the item's
     rank-R output embedding, is part of its input embedding), exact by silu(z) - silu(-z) = z.
   - layer L+1, attention: the last token attends to the candidates' item tokens with score
     ``tau * SCORE + b[label] + gate`` and copies their labels (OUT); ``gate``, carried by LAB, is
     large enough that no other token competes. The label tokens' output rows read OUT.

The result is a plain ``LlamaForCausalLM`` on which every serving mode runs; the label logits
rank candidates by ``tau * logit + b[label]`` (logits proportional to its softmax).
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
