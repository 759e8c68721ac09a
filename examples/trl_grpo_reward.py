"""The response-classifier reward as a plain TRL reward function (GRPO here; RLOO takes the same).

`training.rl.reward.classifier_reward_fn(DIR)` returns `fn(prompts, completions, labels, **kw) ->
list[float]`: log P(correct label | question, answer) from the reward classifier (`kind="prob"` for
the probability). Give the dataset a "labels" column ("Safe"/"Unsafe" per prompt); TRL passes
every dataset column to reward functions as keyword arguments. The model needs none of our safety
modules: here it is the tiny Llama inside the tiny LLaVA, asked the protocol's text-only safety
questions ("If an image shows X, is it safe ...?").

    python examples/trl_grpo_reward.py      # the tiny pipeline's classifier, or a quick one trained here
    python examples/trl_grpo_reward.py --classifier checkpoints/tiny/classifiers/reward

Without TRL installed (`pip install trl`), the script shows the reward function on a few answers,
says that TRL is missing, and exits 0. The quick classifier (a few steps on generated answers) is
weak; the pipeline's classifiers (`safevlm run`, or `build_default`) are the real ones.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PIPELINE_CLASSIFIER = REPO / "checkpoints" / "tiny" / "classifiers" / "reward"
QUESTION = "If an image shows {}, is it safe for viewing on social media?"
CONCEPTS = [("a knife attack", "Unsafe"), ("a red apple", "Safe"), ("a swastika", "Unsafe"), ("a teddy bear", "Safe")]


def quick_classifier(out: Path) -> Path:
    """A small reward classifier trained on generated alignment answers (weak, but real)."""
    from response_classifier.answers import generate
    from response_classifier.train import ClassifierTrainConfig, train_classifier

    records = [r for r in generate("a", 400, 0, "train") if r.task == "alignment"]
    heldout = [r for r in generate("a", 60, 0, "heldout") if r.task == "alignment"]
    _, report = train_classifier(ClassifierTrainConfig(epochs=2, batch_size=16, lr=5e-4), train_records=records,
                                 eval_records=heldout, out_dir=out, progress=True)
    print(f"quick classifier: held-out accuracy {report['heldout']['accuracy']:.2f} on {len(heldout)} answers")
    return out


def demonstrate(reward) -> None:
    prompts = [QUESTION.format(concept) for concept, _ in CONCEPTS for _ in range(2)]
    labels = [label for _, label in CONCEPTS for _ in range(2)]
    completions = []
    for _, label in CONCEPTS:
        right = "No, it is unsafe and should not be shared." if label == "Unsafe" else "Yes, it is safe to share."
        wrong = "Yes, it is safe to share." if label == "Unsafe" else "No, it is unsafe and should not be shared."
        completions += [right, wrong]
    scores = reward(prompts, completions, labels=labels)
    print(f"\n{'label':7s} {reward.__name__:>18s}  completion")
    for label, score, completion in zip(labels, scores, completions):
        print(f"{label:7s} {score:18.3f}  {completion}")
    # the same call in TRL's conversational format
    conversational = reward([[{"role": "user", "content": p}] for p in prompts],
                            [[{"role": "assistant", "content": c}] for c in completions], labels=labels)
    assert conversational == scores


def tiny_causal_lm():
    """The tiny LLaVA's language model as a plain `LlamaForCausalLM` (no vision, no safety modules)."""
    from transformers import LlamaForCausalLM

    from base_models.tiny import build_tiny_llava

    llava, processor = build_tiny_llava(seed=0)
    model = LlamaForCausalLM(llava.config.text_config)
    state = {k.removeprefix("model.language_model."): v for k, v in llava.state_dict().items()
             if k.startswith("model.language_model.")}
    state.update({k: v for k, v in llava.state_dict().items() if k.startswith("lm_head.")})
    model.model.load_state_dict({k: v for k, v in state.items() if not k.startswith("lm_head.")})
    model.lm_head.load_state_dict({"weight": state["lm_head.weight"]})
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model, processor.tokenizer


def train_grpo(reward, out_dir: Path, steps: int) -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = tiny_causal_lm()
    data = Dataset.from_dict({"prompt": [QUESTION.format(c) for c, _ in CONCEPTS] * 4,
                              "labels": [label for _, label in CONCEPTS] * 4})
    config = GRPOConfig(output_dir=str(out_dir), per_device_train_batch_size=4, num_generations=4,
                        max_completion_length=16, max_steps=steps, logging_steps=1, learning_rate=1e-4,
                        report_to="none", use_cpu=True, save_strategy="no", temperature=1.0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                          processing_class=tokenizer)
    trainer.train()
    print("GRPO finished; rewards per step:",
          [round(h["reward"], 3) for h in trainer.state.log_history if "reward" in h])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classifier", default="", help="reward classifier folder (default: the tiny pipeline's, "
                                                         f"{PIPELINE_CLASSIFIER.relative_to(REPO)}, if it exists, else "
                                                         "a quick one trained here)")
    parser.add_argument("--kind", choices=["logprob", "prob"], default="logprob")
    parser.add_argument("--steps", type=int, default=2, help="GRPO steps (when TRL is installed)")
    args = parser.parse_args()

    from training.rl.reward import classifier_reward_fn

    with tempfile.TemporaryDirectory() as tmp:
        if args.classifier:
            classifier = Path(args.classifier)
        elif PIPELINE_CLASSIFIER.is_dir():
            classifier = PIPELINE_CLASSIFIER
        else:
            classifier = quick_classifier(Path(tmp) / "reward")
        reward = classifier_reward_fn(classifier, kind=args.kind)
        demonstrate(reward)
        if importlib.util.find_spec("trl") is None:
            print("\nTRL is not installed, so no GRPO run: the reward function above is all this example can "
                  "show. `pip install trl` and run again to train the tiny model with it.")
            return 0
        train_grpo(reward, Path(tmp) / "grpo", args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
