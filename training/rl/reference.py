"""PPO's KL reference: the frozen starting policy, kept in the policy's own trunk.

PPO starts from stage 2: its LoRA, its LLM-side safety tokens and its modules. The reference must be
exactly that model for the whole run, so that the KL of the first rollout is 0 and the penalty sees
every change the policy makes, through the LoRA and through the safety tokens alike. "LoRA disabled"
would be the model before stage 2's LoRA (stage 0 + modules), not the start; a reference reading the
live safety tokens would move with the policy.

How, without a second copy of the base: the starting LoRA is copied once into a second PEFT adapter
(`REFERENCE_ADAPTER`, frozen) beside the trained one, and the safety-module tensors the reference
pass reads (the LLM-side safety tokens) or the policy trains are copied into buffers. The buffers are
non-persistent and live outside `model.safety`, so neither checkpoints (trainable tensors only) nor
the exported adapter (`model.safety` + the active LoRA) carry them; a resumed run rebuilds the
reference from the starting adapter exactly as the first run built it. A reference pass switches the
active adapter and reads the snapshot in place of the live tensors (`torch.func.functional_call`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from safety_modules.attach import SafetyVLM
from safety_modules.lora import adapter_active, add_frozen_copy, has_lora

REFERENCE_ADAPTER = "reference"
REFERENCE_KIND = "start"            # what the run summary records: the frozen starting policy
LLM_PATH_SAFETY_TENSORS = ("llm_tokens",)   # the safety tensors an LLM forward reads (the head is not run)


class StartingPolicy(nn.Module):
    """The reference's own tensors: a frozen copy of the LoRA (inside the PEFT model) and a snapshot
    of the safety tensors, both taken from `model` at construction."""

    def __init__(self, model: SafetyVLM) -> None:
        super().__init__()
        self.has_lora = has_lora(model)
        self.source = model.base.active_adapter if self.has_lora else ""    # the LoRA the policy trains
        if self.has_lora:
            add_frozen_copy(model, REFERENCE_ADAPTER)
        self.names = sorted({n for n, p in model.safety.named_parameters() if p.requires_grad}
                            | set(LLM_PATH_SAFETY_TENSORS))
        for name in self.names:
            self.register_buffer(self._buffer(name), model.safety.get_parameter(name).detach().clone(),
                                 persistent=False)
        self.check_covers(model)

    @staticmethod
    def _buffer(name: str) -> str:
        return "safety__" + name.replace(".", "__")

    def snapshot(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """{`prefix` + safety-module tensor name: its starting value}, for `functional_call`."""
        return {prefix + name: getattr(self, self._buffer(name)) for name in self.names}

    def check_covers(self, model: SafetyVLM) -> None:
        """Fail unless every tensor the policy trains is frozen in the reference (copied LoRA or snapshot):
        a trainable tensor read live by the reference pass would make the reference move."""
        copied = f".{self.source}."
        live = [n for n, p in model.named_parameters() if p.requires_grad
                and not (n.startswith("safety.") and n[len("safety."):] in self.names)
                and not (self.has_lora and "lora_" in n and copied in n)]
        if live:
            raise ValueError(f"PPO reference: trainable tensors {live[:5]} are not in the frozen starting policy "
                             "(only the LoRA and the safety modules' tensors are copied); freeze them or "
                             "construct the policy after choosing what it trains")

    @contextmanager
    def active(self, model: SafetyVLM) -> Iterator[dict[str, torch.Tensor]]:
        """Within the block the model's reference adapter computes; yields the snapshot keyed by the
        model's own parameter names ("safety.<name>") for `functional_call`."""
        self.check_covers(model)
        with adapter_active(model, REFERENCE_ADAPTER) if self.has_lora else nullcontext():
            yield self.snapshot("safety.")
