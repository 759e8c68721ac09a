"""One recipe per training method (TRL/torchtune style): a config dataclass + `run_<name>(cfg)`.

`registry.py` lists them (the one place a method is registered); `common.py` holds what every
recipe shares; `start.py`, `baseline.py`, `answers.py` and `sweep.py` what the methods on top of
stage 2 share (their starting model, their held-out slice, their judged answers, their sweep).
Each recipe builds its model, records and loss and hands them to `training.engine.Trainer`.
"""
