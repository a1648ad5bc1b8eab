"""The ViT: presets and checkpoints, the split into client front and server back, the
CLS-attention row ADC ranks by, how images become inputs, and FLOPs for the clock."""
