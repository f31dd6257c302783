"""Training recipes shipped with cores: ``cores train --config NAME`` (see docs/TRAINING.md)."""
