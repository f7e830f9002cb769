"""The DeepSpeed engine and the loop, checkpoints, exports and logging."""
