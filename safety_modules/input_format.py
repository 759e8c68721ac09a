"""How a base model's inputs are formatted: its image preprocessing and its conversation template.

Why one place, below training and evaluation: an adapter learns from the inputs it was trained on,
so training and evaluation must format images and prompts the same way. LLaVA-1.5 was trained on
images padded to a square with the image processor's mean colour (the Hugging Face processor
centre-crops instead, which can cut an object at the edge off) and on its own `llava_v1`
conversation template; both are settings here, applied to the processor when the base is loaded.
"""

from __future__ import annotations

from safety_modules.images import use_square_padding
from safety_modules.prompting import CONVERSATIONS, use_conversation

# How images reach the model: the processor's own preprocessing, or LLaVA-1.5's padding to a square.
PROCESSOR_PREPROCESS = "processor"
PAD_TO_SQUARE = "pad_to_square"
IMAGE_PREPROCESS = (PROCESSOR_PREPROCESS, PAD_TO_SQUARE)
CONVERSATION_NAMES = ("", *CONVERSATIONS)          # "": the processor's own chat template


def configure_input(processor, image_preprocess: str = PROCESSOR_PREPROCESS, conversation: str = ""):
    """Apply the input settings to a processor (before an adapter copies it); returns it."""
    if image_preprocess not in IMAGE_PREPROCESS:
        raise ValueError(f"image_preprocess: must be one of {list(IMAGE_PREPROCESS)}, got {image_preprocess!r}")
    if conversation not in CONVERSATION_NAMES:
        raise ValueError(f"conversation: must be one of {list(CONVERSATION_NAMES)}, got {conversation!r}")
    if image_preprocess == PAD_TO_SQUARE:
        use_square_padding(processor)
    if conversation:
        use_conversation(processor, conversation)
    return processor
