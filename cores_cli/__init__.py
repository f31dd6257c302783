"""cores: CoReS reasoning segmentation (chain of reasoning in LLaVA, chain of segmenting in SAM)."""

__version__ = "0.1.0.dev0"
