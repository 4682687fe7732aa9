"""The old import path of the `vqa-async batch` job, which lives with the client it drives: vqa_async.client.bulk."""

from vqa_async.client.bulk import (
    CHAT_URL,
    BatchInputError,
    Line,
    Summary,
    Writer,
    add_arguments,
    answered_ids,
    main,
    read_input,
)

__all__ = ["CHAT_URL", "BatchInputError", "Line", "Summary", "Writer", "add_arguments", "answered_ids", "main",
           "read_input"]
