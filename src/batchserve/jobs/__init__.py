"""Async jobs: the record, the queue and result-store backends, and the worker loop that
feeds pulled jobs into the one `Batcher`."""
