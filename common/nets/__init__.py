"""Segmentation backbones behind ``common.model``: each maps (B,C,S,S) to mask logits plus the
feature maps the classification heads read (deepest first). GroupNorm only, Opacus-compatible
layers only (Conv2d, GroupNorm, LayerNorm, Linear; no BatchNorm, PReLU or transposed conv)."""
