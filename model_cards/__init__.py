"""Model card templates, shipped as package data (``modeling_deepseek_v3.model_cards``)."""
