"""The ``finetune`` recipe: a pretrained Hugging Face checkpoint (Llama, Qwen2/3, Mistral) trained on
the label loss, with LoRA adapters (peft) or every weight; ``rcllm train --base-model`` selects it.

``recipe.py`` orchestrates; ``precision.py`` chooses device and autocast; ``adapters.py`` wraps the
model for training and saves the result (adapter folder, merged folder, or full weights);
``loop.py`` is the training loop (Accelerate: one process, or several under ``accelerate launch``);
``checkpoint.py`` keeps the resumable state. Reference: docs/training.md.
"""

from .recipe import finetune_ranker

__all__ = ["finetune_ranker"]
