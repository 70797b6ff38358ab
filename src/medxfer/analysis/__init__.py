"""Analyses beyond transfer accuracy, each a registered protocol: occlusion saliency with attentive
diffusion, invariance, deep-image-prior reconstruction scored with LPIPS, transferability scores.

Import the submodules directly (``medxfer.analysis.saliency`` etc.); this package stays light.
"""
