"""Dataset recipes: programs that generate a data set (and what ships with it), not part of the training pipeline."""
