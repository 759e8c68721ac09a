"""`safevlm dpo --config FILE [key=value ...] [--resume] [--sweep key=v1,v2,...]`: the DPO baseline.

Pairs from `data.train=WORLD/records/dpo.jsonl` (chosen = the gpt turn, rejected = `rejected`);
`--sweep` keeps the run whose greedy answers on the held-out slice of the training records are most
often right, ties broken by the held-out DPO loss (training/recipes/dpo.py says why).
Arguments as for `safevlm sft` (safevlm/commands/sft.py).
"""

from __future__ import annotations

from safevlm.commands.sft import register_baseline


def register(subparsers) -> None:
    register_baseline(subparsers, "dpo")
