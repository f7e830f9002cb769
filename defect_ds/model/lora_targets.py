"""Which LoRA targets act on text tokens: the mask never gates them (they have no position), so with
one of them a zero mask is not the base model. Imports nothing, so the config check of prior
preservation reads the model's list without loading torch.
"""

# module-name suffixes of the UNet layers whose inputs are text tokens (cross-attention keys and values)
TEXT_SIDE_TARGETS = ("attn2.to_k", "attn2.to_v", "add_k_proj", "add_v_proj")
