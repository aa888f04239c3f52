from .fcos import FCOS, build_fcos_from_cfg, build_fcos_resnet_fpn_backbone
