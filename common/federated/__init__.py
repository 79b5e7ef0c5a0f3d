"""Stage 4, federated training: the message format both Flower apps share, codecs, aggregation."""
