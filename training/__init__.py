"""Training: data records, the DeepSpeed engine, one recipe per method."""
