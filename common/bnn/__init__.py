"""Stage 3, the binary neural network on the codes: model, training loop, saved form, one-task pipeline."""
