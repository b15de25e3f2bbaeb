"""Flax NNX models: Llama-family decoder, CLIP vision tower, LLaVA-1.5 / LLaVA-NeXT, HF import/export."""
