"""RTVLM judges behind one small interface (`eval.judges.base`), chosen by a SPEC string.

    openai:MODEL      an OpenAI-compatible chat API (OPENAI_BASE_URL, OPENAI_API_KEY)
    local:PATH        a local `transformers` causal LM folder, prompted with the same rubric
    classifier:DIR    offline: the response classifier + refusal detection mapped to 1-10 (coarse)
"""

from __future__ import annotations

import inspect
import typing

from eval.judges.base import Judge, JudgeError
from eval.judges.classifier import ClassifierJudge
from eval.judges.local import LocalJudge
from eval.judges.openai import OpenAIJudge
from safety_modules.configio import ConfigError, coerce

JUDGES: dict[str, type] = {"openai": OpenAIJudge, "local": LocalJudge, "classifier": ClassifierJudge}


def parse_spec(spec: str) -> tuple[str, str]:
    """'openai:gpt-4o' -> ('openai', 'gpt-4o'); a JudgeError naming the known kinds otherwise."""
    if not isinstance(spec, str) or ":" not in spec:
        raise JudgeError(f"judge spec {spec!r}: expected KIND:ARG with KIND one of {sorted(JUDGES)} "
                         "(e.g. openai:gpt-4o, local:/models/judge, classifier:checkpoints/clf)")
    kind, arg = spec.split(":", 1)
    if kind not in JUDGES:
        raise JudgeError(f"judge spec {spec!r}: unknown kind {kind!r}; known: {sorted(JUDGES)}")
    if not arg.strip():
        raise JudgeError(f"judge spec {spec!r}: the part after '{kind}:' is empty")
    return kind, arg.strip()


def check_options(kind: str, options: dict) -> dict:
    """`options` checked against the judge class's constructor: an unknown name or a value of the
    wrong type is a JudgeError naming the option and what it takes (values coerced as config values)."""
    cls = JUDGES[kind]
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
              if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not inspect.Parameter.empty}
    hints = typing.get_type_hints(cls.__init__)
    checked = {}
    for key, value in options.items():
        if key not in params:
            raise JudgeError(f"judge option {key!r}: not an option of {kind} judges (options: {', '.join(sorted(params))})")
        try:
            checked[key] = coerce(value, hints.get(key, typing.Any), key) if isinstance(value, (str, int, float, bool, list)) \
                else value
        except ConfigError as exc:
            raise JudgeError(f"judge option {exc}") from None
    return checked


def build_judge(spec: str, **options) -> Judge:
    """The judge a SPEC names; `options` go to its constructor (e.g. cache=..., max_workers=...),
    checked first by name and type."""
    kind, arg = parse_spec(spec)
    return JUDGES[kind](arg, **check_options(kind, options))
