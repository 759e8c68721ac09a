"""The label vocabulary every layer shares: the loss's ignore index, the verdicts and the
perception options, and which labels each task's answers take. One place, so that training,
the response classifier and evaluation never retype them."""

from __future__ import annotations

# Labels the losses skip: prompt and padding tokens, a record without a safety level or risk type.
IGNORE_INDEX = -100

SAFE = "Safe"
UNSAFE = "Unsafe"
NA = "NA"                                   # an answer that gives no verdict (or no option)
VERDICTS: tuple[str, ...] = (SAFE, UNSAFE)
OPTIONS: tuple[str, ...] = ("A", "B", "C", "D")

ALIGNMENT = "alignment"                     # is the image safe? answered Safe / Unsafe
PERCEPTION = "perception"                   # which concept does the image show? answered A-D
TASKS: tuple[str, ...] = (ALIGNMENT, PERCEPTION)
TASK_LABELS: dict[str, tuple[str, ...]] = {
    ALIGNMENT: (*VERDICTS, NA),
    PERCEPTION: (*OPTIONS, NA),
}
