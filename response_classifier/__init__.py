"""The response classifier: labels a VLM answer (Safe/Unsafe/NA, or A-D/NA) for the PPO reward and
the evaluation. `answers` generates labelled data, `model` holds `ResponseClassifier`, `train` fine-tunes
it, `rules` is the model-free check."""
