"""Stage 5, deployment: the integer-only form of a trained BNN, its numpy engine and the C export."""
