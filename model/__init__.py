"""DeepLabV3 (Chen et al. 2017) on ResNet-50/101, with an optional fused form running on deeplab_ops ops.

    import model
    net = model.deeplabv3_resnet50(num_classes=21, output_stride=16)           # the paper's configuration
    net = model.deeplabv3_resnet50(preset="torchvision", aux_loss=True)        # torchvision's, key for key
    model.load_checkpoint(net, "deeplabv3_resnet50_coco.pth")                  # local files only
    model.load_backbone(net, "resnet50_imagenet.pth")                          # ImageNet initialisation
    deeplab_ops.nn.fuse_modules(net)                                           # or fused=True

`python -m model --summary --backbone resnet50 --output-stride 16 --image-size 513` prints parameters and FLOPs
per stage.
"""

from model.aspp import ASPP, ASPPConv, ASPPPooling
from model.checkpoint import (
    CheckpointMismatchError,
    CheckpointReadError,
    load_backbone,
    load_checkpoint,
    load_file,
    read_state_dict,
    unwrap_model,
)
from model.deeplabv3 import DeepLabV3, deeplabv3_resnet, deeplabv3_resnet50, deeplabv3_resnet101
from model.heads import DeepLabHead, FCNHead
from model.resnet import Bottleneck, PreActBottleneck, ResNet, stage_dilations

__all__ = [
    "ASPP",
    "ASPPConv",
    "ASPPPooling",
    "Bottleneck",
    "CheckpointMismatchError",
    "CheckpointReadError",
    "DeepLabHead",
    "DeepLabV3",
    "FCNHead",
    "PreActBottleneck",
    "ResNet",
    "deeplabv3_resnet",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "load_backbone",
    "load_checkpoint",
    "load_file",
    "read_state_dict",
    "stage_dilations",
    "unwrap_model",
]
