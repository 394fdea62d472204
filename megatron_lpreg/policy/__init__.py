"""The Megatron side of a GRPO step: model setup, the log-prob and train passes, batching,
gradients, the optimizer and the training state."""
