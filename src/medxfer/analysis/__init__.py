"""Analyses beyond the transfer protocols: deep-image-prior reconstruction, perceptual distance,
transferability scores. Import the submodules directly (``medxfer.analysis.dip`` etc.)."""
