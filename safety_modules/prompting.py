"""One way to turn a question (and an answer) into the model's conversation text.

Why: the collator, the guard, the evaluator and PPO must all format prompts identically, or the
safety head and the LoRA see text at inference they never saw in training. The processor's own chat
template decides the format (LLaVA-1.5's "USER: <image>\n... ASSISTANT:" on the tiny model and
llava-1.5-hf, "[INST] ... [/INST]" on llava-v1.6-mistral); `use_conversation` replaces it by an
original template, such as the original LLaVA-1.5's `llava_v1` with its system prompt.
"""

from __future__ import annotations

import inspect

# The original LLaVA code's `conv_templates["llava_v1"]`: this system prompt, then turns
# "USER: <message>" and "ASSISTANT: <message></s>" separated by a space, the image as "<image>\n"
# in front of the first user message, and "ASSISTANT:" opening the answer.
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
# LLaVA-1.5's conversation format (USER: ... ASSISTANT: ...); llava_v1 puts its system prompt first.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} {% else %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
LLAVA_V1_CHAT_TEMPLATE = LLAVA_V1_SYSTEM + " " + LLAVA_CHAT_TEMPLATE
CONVERSATIONS: dict[str, str] = {"llava_v1": LLAVA_V1_CHAT_TEMPLATE}


def use_conversation(processor, name: str):
    """Make `processor` format prompts with the named original conversation template."""
    if name not in CONVERSATIONS:
        raise ValueError(f"conversation: unknown template {name!r}; known: {sorted(CONVERSATIONS)}")
    processor.chat_template = CONVERSATIONS[name]
    return processor


def build_prompt(processor, question: str, with_image: bool = True) -> str:
    """The text up to and including the assistant turn's opening, ready for generation."""
    content: list[dict] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": question})
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def response_suffix(processor) -> str:
    """What follows a response in training text: the tokenizer's end-of-sequence token."""
    return processor.tokenizer.eos_token or ""


def takes_suffix(processor) -> bool:
    """Whether `processor` encodes a response apart from its prompt, as a `suffix` argument.

    Why: a prefix-LM processor (PaliGemma's) appends any text it is given to the prompt, which
    the model reads bidirectionally; only a suffix is typed as the response (and ends with EOS).
    """
    call = getattr(type(processor), "__call__", None)
    return call is not None and "suffix" in inspect.signature(call).parameters


def encode_batch(processor, images: list, texts: list[str], responses: list[str | None] | None = None,
                 **kwargs):
    """`processor(images=..., text=...)` with one image per text, nested per sample.

    Why nested: Gemma 3's and Idefics3's processors read a flat list as one sample holding every
    image; a list of one-image lists means one image per sample for every family's processor.
    `responses`: per text, the response that follows it (None: none), ended by `response_suffix`
    (training text): appended to the text, or passed as the processor's suffix when it takes one.
    Labels are the collator's: a processor's own (read off its token types) are dropped.
    """
    if len(images) != len(texts):
        raise ValueError(f"encode_batch: {len(images)} images for {len(texts)} texts (one image per text)")
    texts = list(texts)
    if responses is not None and any(r is not None for r in responses):
        if len(responses) != len(texts):
            raise ValueError(f"encode_batch: {len(responses)} responses for {len(texts)} texts")
        if takes_suffix(processor):
            if any(r is None for r in responses):
                raise ValueError(f"encode_batch: {type(processor).__name__} encodes responses as a suffix, one "
                                 "per text; this batch mixes texts with and without a response")
            kwargs["suffix"] = list(responses)  # the processor ends each with its EOS
        else:
            texts = [text if response is None else text + response + response_suffix(processor)
                     for text, response in zip(texts, responses)]
    encoded = processor(images=[[image] for image in images], text=texts, **kwargs)
    encoded.pop("labels", None)
    return encoded
