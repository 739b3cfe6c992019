"""Text: rows, templates, tokenizers, training examples, `qlora-kit render`.

Pure: nothing here imports torch (tests/unit/test_layout.py checks it). The tokenizer is always a
parameter, so the same code runs with the real tokenizer, a tiny one, or a one-id-per-character stub.
"""
