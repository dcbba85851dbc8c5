"""fer-edge models: MACNN, VGG16 (its baseline) and HSNet, with a registry.

    from fer_edge import models
    net = models.create("macnn", num_classes=7, in_chans=1, width=0.25)
"""
from fer_edge.models import hsnet, macnn  # importing registers "hsnet", "macnn" and "vgg16"
from fer_edge.models.layers import ACBlock, ConvAct, ConvBNAct, FusedMultiScaleConv, MAConv
from fer_edge.models.macnn import MACNN
from fer_edge.models.registry import create, list_models, register_model

__all__ = ["hsnet", "macnn", "create", "list_models", "register_model", "MACNN", "MAConv", "ACBlock", "ConvBNAct", "ConvAct",
           "FusedMultiScaleConv"]
