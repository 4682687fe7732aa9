"""The model layer: loading, preprocessing and batched answering. Never imports the HTTP layer."""
