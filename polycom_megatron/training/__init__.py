"""Training-side helpers: data preparation for Megatron-Core pretraining runs."""
