"""Adapting pretrained models: LoRA adapters, sequence classification, instruction tuning."""
