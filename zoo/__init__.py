"""CIFAR-native CNN architectures with a timm-style registry.

>>> import zoo
>>> model = zoo.create_model("densenet_bc", num_classes=100, growth_rate=12, compression=0.5)
>>> zoo.model_info(model)["params"]
"""
from zoo._registry import create_model, list_models, model_defaults, model_family, register_model
from zoo.info import count_flops, count_params, model_info, variant_info

# Importing a family module registers its variants.
from zoo import alexnet, bit, densenet, googlenet, inception, resnet, vgg  # noqa: E402,F401
from zoo.bit import load_bit_weights  # noqa: E402

__all__ = [
    "create_model",
    "list_models",
    "model_info",
    "variant_info",
    "model_family",
    "model_defaults",
    "register_model",
    "count_params",
    "count_flops",
    "load_bit_weights",
]
