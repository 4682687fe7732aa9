"""What a serving directory holds, by name, and the error for one that cannot be served. No torch: the cluster's
control plane (`vqa-async cluster reload`) checks a directory with these and never loads a model."""

from __future__ import annotations

WEIGHTS_NAME = "model.safetensors"


class ModelLoadError(Exception):
    """A model directory that cannot be served; the message is one line that says what to fix."""
