"""Training recipes shipped with cores: ``cores train --recipe NAME`` (see docs/TRAINING.md)."""
