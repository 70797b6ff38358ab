"""The model zoo: one ModelSpec per weight set (facts from MODEL_ZOO.md of the project).

The thirteen backbones of Anton et al. 2022 (``in_paper=True``) and a few widely used
additions. ``urls`` are files the spec's format reads directly; where the original must be
fetched by hand (Dropbox, TF conversion) ``urls`` is empty and ``fetch_hint`` says how.
"""
from __future__ import annotations

from medxfer.models.spec import ModelSpec, register_model

TV = "https://download.pytorch.org/models/"
FB = "https://dl.fbaipublicfiles.com/"
TORCHVISION_LICENCE = "BSD-3-Clause (torchvision); trained on ImageNet (non-commercial research terms)"
TORCHVISION_CITATION = "He et al., Deep Residual Learning for Image Recognition, CVPR 2016 / torchvision"
CC_BY_NC = "CC-BY-NC 4.0"
MIMIC_LICENCE = ("CC-BY-NC 4.0 (CovidPrognosis); trained on MIMIC-CXR + CheXpert: their data-use terms apply")
MOCO_CXR_LICENCE = "CC-BY-NC 4.0 (MoCo-CXR); trained on CheXpert: its data-use terms apply"
MIMIC_CITATION = ("Sriram et al., COVID-19 Prognosis via Self-Supervised Representation Learning and "
                  "Multi-Image Prediction, arXiv:2101.04909 (facebookresearch/CovidPrognosis)")
MOCO_CXR_CITATION = ("Sowrirajan et al., MoCo-CXR: MoCo Pretraining Improves Representation and "
                     "Transferability of Chest X-ray Models, MIDL 2021")


def _torchvision(name: str, arch: str, file: str, top1: float, **kw: object) -> ModelSpec:
    return ModelSpec(name=name, arch=arch, family="supervised", urls=(TV + file,),
                     filename=file, hash_prefix=file.rsplit("-", 1)[1].split(".")[0], fmt="torchvision",
                     imagenet_top1=top1, licence=TORCHVISION_LICENCE, **kw)  # type: ignore[arg-type]


def _mimic(lr: str) -> ModelSpec:
    file = f"mimic-chexpert_lr_{lr}_bs_128_fd_128_qs_65536.pt"
    return ModelSpec(
        name=f"mimic-chexpert-lr{lr}", display_name=f"MIMIC-CheXpert (lr={lr})", arch="densenet121",
        family="domain-specific", normalization="histeq-covidprognosis",
        urls=(FB + "CovidPrognosis/pretrained_models/" + file,), filename=file,
        fmt="lightning", prefix="model.encoder_q.", drop=("classifier.",), licence=MIMIC_LICENCE,
        citation=MIMIC_CITATION, in_paper=True,
        notes=f"MoCo (lr {lr}) on MIMIC-CXR + CheXpert; Lightning checkpoint; input through CovidPrognosis's "
        "histogram normalisation (one histogram per image, 255 * cdf)",
    )


def _moco_cxr(name: str, display_name: str, arch: str, file: str, head: str) -> ModelSpec:
    return ModelSpec(
        name=name, display_name=display_name, arch=arch, family="domain-specific",
        urls=("https://storage.googleapis.com/moco-cxr/" + file,), filename=file, fmt="moco",
        prefix="module.encoder_q.", drop=(head,), licence=MOCO_CXR_LICENCE, citation=MOCO_CXR_CITATION,
        in_paper=True, notes="MoCo on CheXpert; ImageNet normalisation as the paper used "
        f"(native CheXpert statistics: {name}-native)",
    )


PAPER = (
    _torchvision("supervised-r50", "resnet50", "resnet50-0676ba61.pth", 76.13,
                 display_name="Supervised (R50)", drop=("fc.",), imagenet_top1_paper=77.2, citation=TORCHVISION_CITATION,
                 aliases=("resnet50", "supervised", "r50"), in_paper=True,
                 notes="torchvision ResNet50_Weights.IMAGENET1K_V1 (not DEFAULT, which is V2)"),
    _torchvision("supervised-r18", "resnet18", "resnet18-f37072fd.pth", 69.76,
                 display_name="Supervised (R18)", drop=("fc.",), imagenet_top1_paper=72.12, citation=TORCHVISION_CITATION,
                 aliases=("resnet18", "r18"), in_paper=True, notes="torchvision ResNet18_Weights.IMAGENET1K_V1"),
    _torchvision("supervised-d121", "densenet121", "densenet121-a639ec97.pth", 74.43,
                 display_name="Supervised (D121)", drop=("classifier.",), imagenet_top1_paper=74.98,
                 citation="Huang et al., Densely Connected Convolutional Networks, CVPR 2017 / torchvision",
                 aliases=("densenet121", "d121"), in_paper=True,
                 notes="torchvision DenseNet121_Weights.IMAGENET1K_V1 (legacy key names remapped)"),
    ModelSpec(
        name="simclr-v1", display_name="SimCLR-v1", arch="resnet50", family="self-supervised", normalization="none",
        filename="resnet50-1x.pth", fmt="simclr-converted", drop=("fc.",), imagenet_top1=69.3,
        licence="Apache-2.0 (google-research/simclr)",
        citation="Chen et al., A Simple Framework for Contrastive Learning of Visual Representations, ICML 2020",
        aliases=("simclr", "simclrv1"), in_paper=True,
        notes="TF checkpoint converted to PyTorch; input unnormalised [0,1]",
        fetch_hint=("download ResNet50_1x.zip from https://storage.googleapis.com/simclr-gcs/checkpoints/"
                    "ResNet50_1x.zip, convert it with github.com/tonylins/simclr-converter "
                    "(python convert.py ResNet50_1x/model.ckpt-225206 resnet50-1x.pth)"),
    ),
    ModelSpec(
        name="moco-v2", display_name="MoCo-v2", arch="resnet50", family="self-supervised",
        urls=(FB + "moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar",),
        filename="moco_v2_800ep_pretrain.pth.tar", hash_prefix="a04e12f8", hash_algo="md5", fmt="moco",
        prefix="module.encoder_q.", drop=("fc.",), imagenet_top1=71.1, licence=CC_BY_NC,
        citation="Chen et al., Improved Baselines with Momentum Contrastive Learning, arXiv:2003.04297",
        aliases=("moco", "mocov2"), in_paper=True, notes="800 epochs; query encoder, MLP head dropped",
    ),
    ModelSpec(
        name="pirl", display_name="PIRL", arch="resnet50", family="self-supervised", filename="PIRL.pth",
        fmt="pycontrast", prefix="module.encoder.", drop=("head.", "head_jig."), imagenet_top1=61.7,
        licence="not stated by PyContrast (research use; check before redistribution)",
        citation=("Misra & van der Maaten, Self-Supervised Learning of Pretext-Invariant Representations, "
                  "CVPR 2020 (PyContrast re-implementation)"),
        in_paper=True, notes="PyContrast model zoo",
        fetch_hint=("download PIRL.pth from the PyContrast model zoo (Dropbox link in "
                    "github.com/HobbitLong/PyContrast/blob/master/pycontrast/docs/MODEL_ZOO.md)"),
    ),
    ModelSpec(
        name="swav", display_name="SwAV", arch="resnet50", family="self-supervised",
        urls=(FB + "deepcluster/swav_800ep_pretrain.pth.tar",), filename="swav_800ep_pretrain.pth.tar",
        fmt="swav", prefix="module.", drop=("projection_head.", "prototypes."), imagenet_top1=75.3,
        licence=CC_BY_NC,
        citation=("Caron et al., Unsupervised Learning of Visual Features by Contrasting Cluster Assignments, "
                  "NeurIPS 2020"),
        in_paper=True, notes="800 epochs, multi-crop",
    ),
    ModelSpec(
        name="byol", display_name="BYOL", arch="resnet50", family="self-supervised",
        urls=("https://storage.googleapis.com/deepmind-byol/checkpoints/pretrain_res50x1.pkl",),
        filename="pretrain_res50x1.pkl", fmt="byol-haiku", prefix="res_net50/~/", drop=("logits",),
        imagenet_top1=74.3, licence=CC_BY_NC,
        citation="Grill et al., Bootstrap Your Own Latent, NeurIPS 2020",
        in_paper=True, notes="JAX/Haiku pickle (570 MB) converted to torchvision; online network. "
        "Haiku uses SAME padding in the stem, torchvision symmetric padding (as every conversion)",
    ),
    _mimic("0.01"),
    _mimic("0.1"),
    _mimic("1.0"),
    _moco_cxr("moco-cxr-r18", "MoCo-CXR (R18)", "resnet18", "r8w-00001.pth.tar", "fc."),
    _moco_cxr("moco-cxr-d121", "MoCo-CXR (D121)", "densenet121", "d1w-00001.pth.tar", "classifier."),
)

VARIANTS = tuple(
    ModelSpec(
        name=f"{s.name}-native", display_name=f"{s.label[:-1]}, CheXpert norm.)", arch=s.arch, family=s.family,
        normalization="chexpert", licence=s.licence, citation=s.citation, base=s.name,
        notes=f"{s.name} weights with MoCo-CXR's native CheXpert statistics (mean 0.5020, std 0.085585)",
    )
    for s in PAPER if s.name.startswith("moco-cxr")
)

BEYOND = (
    _torchvision("supervised-r50-v2", "resnet50", "resnet50-11ad3fa6.pth", 80.858, drop=("fc.",),
                 display_name="Supervised (R50, V2 weights)",
                 citation=TORCHVISION_CITATION, notes="torchvision ResNet50_Weights.IMAGENET1K_V2 (= DEFAULT)"),
    _torchvision("supervised-vit-b16", "vit_b_16", "vit_b_16-c867db91.pth", 81.072, drop=("heads.",),
                 display_name="Supervised (ViT-B/16)",
                 citation="Dosovitskiy et al., An Image is Worth 16x16 Words, ICLR 2021 / torchvision",
                 notes="torchvision ViT_B_16_Weights.IMAGENET1K_V1; CLS-token features"),
    ModelSpec(
        name="dino-r50", display_name="DINO (R50)", arch="resnet50", family="self-supervised",
        urls=(FB + "dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",),
        filename="dino_resnet50_pretrain.pth", fmt="swav", drop=("fc.",), imagenet_top1=75.3,
        licence="Apache-2.0 (facebookresearch/dino)",
        citation="Caron et al., Emerging Properties in Self-Supervised Vision Transformers, ICCV 2021",
    ),
    ModelSpec(
        name="barlowtwins-r50", display_name="Barlow Twins (R50)", arch="resnet50", family="self-supervised",
        urls=(FB + "barlowtwins/ep1000_bs2048_lrw0.2_lrb0.0048_lambd0.0051/resnet50.pth",),
        filename="barlowtwins_resnet50.pth", fmt="swav", drop=("fc.",), imagenet_top1=73.2,
        licence="MIT (facebookresearch/barlowtwins)",
        citation="Zbontar et al., Barlow Twins: Self-Supervised Learning via Redundancy Reduction, ICML 2021",
        aliases=("barlowtwins",),
    ),
    ModelSpec(
        name="vicreg-r50", display_name="VICReg (R50)", arch="resnet50", family="self-supervised",
        urls=(FB + "vicreg/resnet50.pth",), filename="vicreg_resnet50.pth", fmt="swav", drop=("fc.",),
        imagenet_top1=73.2, licence="MIT (facebookresearch/vicreg)",
        citation="Bardes et al., VICReg: Variance-Invariance-Covariance Regularization, ICLR 2022",
        aliases=("vicreg",),
    ),
    ModelSpec(
        name="dinov2-vits14", display_name="DINOv2 (ViT-S/14)", arch="dinov2_vits14", family="self-supervised",
        urls=(FB + "dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",), filename="dinov2_vits14_pretrain.pth",
        fmt="dinov2", drop=("mask_token",), imagenet_top1=81.1, licence="Apache-2.0 (facebookresearch/dinov2)",
        citation="Oquab et al., DINOv2: Learning Robust Visual Features without Supervision, TMLR 2024",
        notes="ViT-S/14, CLS token; position embeddings interpolated to the input grid",
    ),
    ModelSpec(
        name="dinov2-vitb14", display_name="DINOv2 (ViT-B/14)", arch="dinov2_vitb14", family="self-supervised",
        urls=(FB + "dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",), filename="dinov2_vitb14_pretrain.pth",
        fmt="dinov2", drop=("mask_token",), imagenet_top1=84.5, licence="Apache-2.0 (facebookresearch/dinov2)",
        citation="Oquab et al., DINOv2: Learning Robust Visual Features without Supervision, TMLR 2024",
        notes="ViT-B/14, CLS token; position embeddings interpolated to the input grid",
    ),
)

HF = "https://huggingface.co/"
XRV_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
HF_HEADS = ("embeddings.mask_token", "pooler.")

# The public medical foundation models (issue 15). Facts from their model cards and code: key layouts in
# medxfer/models/foundation.py; none publishes a file hash, so the download's SHA-256 is recorded when it is
# converted. Their licences differ: each is shown by `medxfer ls models`.
FOUNDATION = (
    ModelSpec(
        name="xrv-densenet121-all", arch="densenet121_1ch", family="domain-specific", normalization="xrv",
        urls=("https://github.com/mlmed/torchxrayvision/releases/download/v1/" + XRV_FILE,), filename=XRV_FILE,
        fmt="xrv-pickle", drop=("classifier.", "op_threshs"),
        licence="Apache-2.0 (torchxrayvision); trained on NIH, PadChest, CheXpert, MIMIC-CXR, Google, OpenI, "
                "RSNA: their data-use terms apply",
        citation=("Cohen et al., TorchXRayVision: A library of chest X-ray datasets and models, MIDL 2022; "
                  "Cohen et al., On the limits of cross-domain generalization in automated X-ray prediction, "
                  "MIDL 2020"),
        aliases=("densenet121-res224-all", "xrv-all"),
        notes="torchxrayvision densenet121-res224-all (a whole pickled model, read without torchxrayvision); "
              "one input channel scaled to [-1024, 1024] (colour averaged to grey); features = ReLU + average "
              "pool of the last block (1024-d), as its features2; 224 px",
    ),
    ModelSpec(
        name="rad-dino", arch="dinov2_vitb14", family="domain-specific", normalization="rad-dino",
        urls=(HF + "microsoft/rad-dino/resolve/main/model.safetensors",), filename="rad-dino.safetensors",
        fmt="hf-dinov2", drop=HF_HEADS,
        licence="MSRLA (Microsoft Research Licence Agreement, research use only; later hub revisions say MIT: "
                "check the revision you download); trained on chest X-ray data with their own terms",
        citation=("Pérez-García et al., Exploring scalable medical image encoders beyond text supervision, "
                  "Nature Machine Intelligence 2025 (RAD-DINO)"),
        notes="chest X-ray DINOv2 ViT-B/14 (HuggingFace Dinov2Model), CLS token; native input 518 px (shortest "
              "edge 518, centre crop, bicubic) with mean 0.5307 / std 0.2583 (its preprocessor_config.json): use "
              "--image-size 518 for that; at 224 the position embeddings are interpolated",
    ),
    ModelSpec(
        name="retfound-mae", arch="mae_vitl16", family="domain-specific", normalization="imagenet",
        filename="RETFound_cfp_weights.pth", fmt="mae", drop=("mask_token", "decoder_", "head.", "fc_norm."),
        licence="CC-BY-NC 4.0 (RETFound); trained on Moorfields and public fundus data",
        citation="Zhou et al., A foundation model for generalizable disease detection from retinal images, Nature 2023",
        aliases=("retfound",),
        notes="MAE ViT-L/16 pretrained on 904k colour fundus photographs (the encoder of the MAE checkpoint, "
              "decoder dropped); CLS token after the final norm (MAE's linear-probe feature); ImageNet "
              "normalisation, 224 px. RETFound's DINOv2 variant is only on a gated hub repository: not included",
        fetch_hint=("download RETFound_cfp_weights.pth (colour fundus, MAE) from the links in "
                    "github.com/rmaphoh/RETFound_MAE (the hub copy YukunZhou/RETFound_mae_natureCFP asks you to "
                    "accept its terms first)"),
    ),
    ModelSpec(
        name="phikon-v2", arch="dinov2_vitl16", family="domain-specific", normalization="imagenet",
        urls=(HF + "owkin/phikon-v2/resolve/main/model.safetensors",), filename="phikon-v2.safetensors",
        fmt="hf-dinov2", drop=HF_HEADS,
        licence="Owkin non-commercial licence (weights public, not gated; check upstream); trained on public "
                "histology slides (TCGA, CPTAC, GTEx, ...)",
        citation="Filiot et al., Phikon-v2, A large and public feature extractor for biomarker prediction, "
                 "arXiv:2409.09173",
        notes="histopathology DINOv2 ViT-L/16 (HuggingFace Dinov2Model, no registers) on 460M H&E tiles at 20x; "
              "CLS token; ImageNet normalisation, 224 px tiles",
    ),
)

for _spec in (*PAPER, *VARIANTS, *BEYOND, *FOUNDATION):
    register_model(_spec)

# A dummy model for tests and quick checks (lm-evaluation-harness style): random weights only.
register_model(ModelSpec(
    name="test-tiny", arch="tinycnn", family="random", fmt="none",
    licence="n/a (random weights)", notes="4-layer CNN for tests; has no pretrained weights",
))
