"""Several `vqa-async serve` processes behind HAProxy, supervised."""
