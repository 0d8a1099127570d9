"""nginx in front of batchserve replicas."""
