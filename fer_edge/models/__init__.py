"""fer-edge models: MACNN, VGG16 (MACNN's body without MAConv), HSNet (the HSNet paper's
network) and hsnet-lite (a smaller variant), with a registry.

    from fer_edge import models
    net = models.create("macnn", num_classes=7, in_chans=1, width=0.25)
"""
from fer_edge.models import hsnet, hsnet_lite, macnn  # importing registers the models
from fer_edge.models.layers import ACBlock, ConvAct, ConvBNAct, FusedMultiScaleConv, MAConv
from fer_edge.models.macnn import MACNN
from fer_edge.models.registry import create, list_models, register_model

__all__ = ["hsnet", "hsnet_lite", "macnn", "create", "list_models", "register_model", "MACNN", "MAConv", "ACBlock", "ConvBNAct", "ConvAct",
           "FusedMultiScaleConv"]
