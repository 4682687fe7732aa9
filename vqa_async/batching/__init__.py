"""Between HTTP and the model: work items, the queue, batch collection and the thread that owns the model."""
