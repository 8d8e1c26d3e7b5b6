"""Models: small CIFAR/MNIST networks and a bridge to timm and torchvision.

Every model `build_model` returns has `features(x) -> (N, F)`, a linear `head` with
`forward(x) == head(features(x))`, and `block_names` (qualified names of its blocks in
forward order) for the experiments that address layers by name. Inputs are float images
(N, in_channels, image_size, image_size) in [0, 1]; no normalization layer unless asked for
(bridged models take normalize=...).

Block names:
  resnet18  stem, layer1.0, layer1.1, ..., layer4.1         (9 blocks)
  resnet20  stem, layer1.0, ..., layer1.2, ..., layer3.2    (10 blocks)
  vgg11     conv1 ... conv8; vgg16: conv1 ... conv13         (conv-BN-ReLU units)
  small-cnn conv1, conv2, conv3
  mlp<d>    fc1 ... fc<d-1>                                  (Linear-ReLU units)
  vit-tiny  blocks.0 ... blocks.<depth-1>                    (outputs are (N, T, D) tokens)
  timm:NAME net.<module> from timm's feature_info (e.g. net.layer1 ... net.layer4)
  tv:NAME   net.<module> found by discover_blocks (e.g. net.layer1.0 ... net.layer4.1)

timm and torchvision are imported only when a "timm:" / "tv:" model is built.
"""
from .base import Classifier
from .bridges import BridgedModel, discover_blocks
from .introspect import block_outputs, features_and_head, get_submodule, model_blocks
from .registry import build_model, check_model_fits, list_models, model_from_checkpoint, model_option_names
from .weights import load_pretrained, load_weights

__all__ = [
    "Classifier",
    "BridgedModel",
    "build_model",
    "list_models",
    "model_from_checkpoint",
    "check_model_fits",
    "model_option_names",
    "model_blocks",
    "block_outputs",
    "features_and_head",
    "get_submodule",
    "load_pretrained",
    "load_weights",
    "discover_blocks",
]
