"""Stage 1, the data: image data sets and their sources, classification tasks, client partitions."""
