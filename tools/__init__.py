"""Tools for developing vqa-async (training the demo model, measuring memory): not shipped in the wheel."""
