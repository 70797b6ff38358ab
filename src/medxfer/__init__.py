"""medxfer: which pretrained backbone transfers best to your medical images."""
__version__ = "0.1.0"
