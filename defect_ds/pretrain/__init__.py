"""`defect-ds pretrain-base`: a small Stable-Diffusion-format base model trained from scratch."""
