"""The Stable Diffusion parts, what trains, mask gating, learned tokens and the diffusion objective."""
