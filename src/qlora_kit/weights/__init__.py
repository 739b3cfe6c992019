"""Model weights on disk: safetensors shards read and written tensor by tensor, the LoRA
merge, and the rest of a complete Hugging Face folder (tokenizer, configs, model card).
"""
