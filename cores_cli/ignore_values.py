"""The two "leave this out" values, shared by the readers, the processor, the model and the metrics."""

IGNORE = 255
"""A mask pixel that counts neither as object nor as background: a reader's ignore region, or
the padding around an image in SAM's square input. Left out of the loss and of IoU."""

IGNORE_INDEX = -100
"""A token label the cross-entropy skips (PyTorch's default): everything but the answers."""
