"""The tiny recipe's own model and data: Llama / GPT-NeoX models built from a seed, tokenizers
trained on the shipped sample, and the generator of that sample (assets/).
"""
