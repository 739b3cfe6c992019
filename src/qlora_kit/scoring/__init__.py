"""Numbers about models: losses and log-probabilities (HF and GGUF), generations, the
source's expected numbers, lm-evaluation-harness presets, and the evaluate stage's report.
"""
