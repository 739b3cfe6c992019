"""qlora-kit: reproduce published QLoRA instruction fine-tunes end to end, with proof.

Stages (each a module, a DVC stage, a CLI verb and a Make target of the same name):
fetch -> preprocess -> train -> merge -> quantize -> evaluate. See README.md.
"""
__version__ = "0.1.0"
