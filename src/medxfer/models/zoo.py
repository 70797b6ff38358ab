"""The model zoo: one ModelSpec per weight set (see docs in MODEL_ZOO.md of the project)."""
from __future__ import annotations

from medxfer.models.spec import ModelSpec, register_model

TORCHVISION_LICENCE = "BSD-3-Clause (torchvision); trained on ImageNet (non-commercial research terms)"
TORCHVISION_CITATION = "He et al., Deep Residual Learning for Image Recognition, CVPR 2016 / torchvision"

SUPERVISED = (
    ModelSpec(
        name="supervised-r50", arch="resnet50", family="supervised", feature_dim=2048,
        urls=("https://download.pytorch.org/models/resnet50-0676ba61.pth",),
        filename="resnet50-0676ba61.pth", hash_prefix="0676ba61", fmt="torchvision",
        drop=("fc.",), imagenet_top1=76.13, imagenet_top1_paper=77.2,
        licence=TORCHVISION_LICENCE, citation=TORCHVISION_CITATION,
        aliases=("resnet50", "supervised", "r50"), in_paper=True,
        notes="torchvision ResNet50_Weights.IMAGENET1K_V1 (not DEFAULT, which is V2)",
    ),
    ModelSpec(
        name="supervised-r18", arch="resnet18", family="supervised", feature_dim=512,
        urls=("https://download.pytorch.org/models/resnet18-f37072fd.pth",),
        filename="resnet18-f37072fd.pth", hash_prefix="f37072fd", fmt="torchvision",
        drop=("fc.",), imagenet_top1=69.76, imagenet_top1_paper=72.12,
        licence=TORCHVISION_LICENCE, citation=TORCHVISION_CITATION,
        aliases=("resnet18", "r18"), in_paper=True,
        notes="torchvision ResNet18_Weights.IMAGENET1K_V1",
    ),
    ModelSpec(
        name="supervised-d121", arch="densenet121", family="supervised", feature_dim=1024,
        urls=("https://download.pytorch.org/models/densenet121-a639ec97.pth",),
        filename="densenet121-a639ec97.pth", hash_prefix="a639ec97", fmt="torchvision",
        drop=("classifier.",), imagenet_top1=74.43, imagenet_top1_paper=74.98,
        licence=TORCHVISION_LICENCE,
        citation="Huang et al., Densely Connected Convolutional Networks, CVPR 2017 / torchvision",
        aliases=("densenet121", "d121"), in_paper=True,
        notes="torchvision DenseNet121_Weights.IMAGENET1K_V1 (legacy key names remapped)",
    ),
)

for _spec in SUPERVISED:
    register_model(_spec)

# A dummy model for tests and quick checks (lm-evaluation-harness style): random weights only.
register_model(ModelSpec(
    name="test-tiny", arch="tinycnn", family="random", feature_dim=32, fmt="none",
    licence="n/a (random weights)", notes="4-layer CNN for tests; has no pretrained weights",
))
