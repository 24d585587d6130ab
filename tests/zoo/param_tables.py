"""Reference parameter counts of every registered variant, one table per test file that checks them;
tests/zoo/test_zoo.py checks that together they cover the registry."""

# (name, num_classes, hparams, expected, exact, source). Exact integers are what the reference
# implementation's code builds (its published figure is quoted); the others are the paper's rounded
# figures, matched within 2%.
BEARPAW = "bearpaw/pytorch-classification models/cifar"
KUANGLIU = "kuangliu/pytorch-cifar models"
CIFAR100 = "weiaicunzai/pytorch-cifar100 models"
AKAMASTER = "akamaster/pytorch_resnet_cifar10 resnet.py"
DENSENET_PAPER = "Huang et al. 2017 Table 2"
TORCHVISION_DENSENET = "torchvision.models.DenseNet"
PARAM_TABLE = [
    ("alexnet", 10, {}, 2_472_266, True, f"{BEARPAW}/alexnet.py; README 2.47M"),
    ("alexnet", 100, {}, 2_495_396, True, f"{BEARPAW}/alexnet.py at 100 classes"),
    ("vgg11", 10, {}, 9_225_610, True, f"{BEARPAW}/vgg.py vgg11"),
    ("vgg13", 10, {}, 9_410_122, True, f"{BEARPAW}/vgg.py vgg13"),
    ("vgg16", 10, {}, 14_719_818, True, f"{BEARPAW}/vgg.py vgg16"),
    ("vgg19", 10, {}, 20_029_514, True, f"{BEARPAW}/vgg.py vgg19"),
    ("vgg11_bn", 10, {}, 9_231_114, True, f"{KUANGLIU}/vgg.py VGG('VGG11')"),
    ("vgg13_bn", 10, {}, 9_416_010, True, f"{KUANGLIU}/vgg.py VGG('VGG13')"),
    ("vgg16_bn", 10, {}, 14_728_266, True, f"{KUANGLIU}/vgg.py VGG('VGG16')"),
    ("vgg19_bn", 10, {}, 20_040_522, True, f"{BEARPAW}/vgg.py vgg19_bn; README 20.04M"),
    ("vgg11_bn", 100, {"head": "fc4096"}, 28_518_244, True, f"{CIFAR100}/vgg.py; README 28.5M"),
    ("vgg13_bn", 100, {"head": "fc4096"}, 28_703_140, True, f"{CIFAR100}/vgg.py; README 28.7M"),
    ("vgg16_bn", 100, {"head": "fc4096"}, 34_015_396, True, f"{CIFAR100}/vgg.py; README 34.0M"),
    ("vgg19_bn", 100, {"head": "fc4096"}, 39_327_652, True, f"{CIFAR100}/vgg.py; README 39.0M"),
    ("resnet20", 10, {}, 269_722, True, f"{AKAMASTER}; README 0.27M (He et al. 2016 Table 6: 0.27M)"),
    ("resnet32", 10, {}, 464_154, True, f"{AKAMASTER}; README 0.46M"),
    ("resnet44", 10, {}, 658_586, True, f"{AKAMASTER}; README 0.66M"),
    ("resnet56", 10, {}, 853_018, True, f"{AKAMASTER}; README 0.85M"),
    ("resnet110", 10, {}, 1_727_962, True, f"{AKAMASTER}; README 1.7M"),
    ("resnet1202", 10, {}, 19_421_274, True, f"{AKAMASTER}; README 19.4M"),
    ("resnet18", 10, {}, 11_173_962, True, f"{KUANGLIU}/resnet.py ResNet18"),
    ("resnet34", 10, {}, 21_282_122, True, f"{KUANGLIU}/resnet.py ResNet34"),
    ("resnet50", 10, {}, 23_520_842, True, f"{KUANGLIU}/resnet.py ResNet50"),
    ("resnet18", 100, {}, 11_220_132, True, f"{CIFAR100}/resnet.py; README 11.2M"),
    ("resnet34", 100, {}, 21_328_292, True, f"{CIFAR100}/resnet.py; README 21.3M"),
    ("resnet50", 100, {}, 23_705_252, True, f"{CIFAR100}/resnet.py; README 23.7M"),
    ("densenet", 10, {"depth": 40, "growth_rate": 12}, 1_000_000, False, f"{DENSENET_PAPER}: L=40 k=12 1.0M"),
    ("densenet", 10, {"depth": 100, "growth_rate": 12}, 7_000_000, False, f"{DENSENET_PAPER}: L=100 k=12 7.0M"),
    ("densenet", 10, {"depth": 100, "growth_rate": 24}, 27_200_000, False, f"{DENSENET_PAPER}: L=100 k=24 27.2M"),
    ("densenet_bc", 10, {"depth": 100, "growth_rate": 12}, 769_162, True,
     f"{BEARPAW}/densenet.py; README 0.77M ({DENSENET_PAPER}: 0.8M)"),
    ("densenet_bc", 10, {"depth": 250, "growth_rate": 24}, 15_300_000, False, f"{DENSENET_PAPER}: L=250 k=24 15.3M"),
    ("densenet_bc", 10, {"depth": 190, "growth_rate": 40}, 25_624_430, True,
     f"{BEARPAW}/densenet.py; README 25.62M ({DENSENET_PAPER}: 25.6M)"),
    ("densenet121", 100, {}, 7_048_548, True, f"{CIFAR100}/densenet.py; README 7.0M"),
    ("densenet169", 100, {}, 12_643_172, True, f"{CIFAR100}/densenet.py densenet169"),
    ("densenet201", 100, {}, 18_277_220, True, f"{CIFAR100}/densenet.py; README 18M"),
    ("densenet161", 100, {}, 26_681_188, True, f"{CIFAR100}/densenet.py; README 26M"),
    # No reference repository builds DenseNet-264 with this stem: the count is torchvision's build with its
    # ImageNet stem swapped (tests/zoo/test_densenet.py::test_imagenet_configs_match_torchvision).
    ("densenet264", 100, {}, 30_909_796, True,
     f"{TORCHVISION_DENSENET}(32, (6, 12, 64, 48), 64) 30,917,604 - 7x7 stem and norm0 (7,808)"),
]

# (variant, classes, cifar-stem params, source). timm's resnetv2_*_bit differs from our
# stem="imagenet" build in nothing, and from stem="cifar" only in the 7x7 vs 3x3 stem conv:
# timm - (7*7 - 3*3) * 3 * stem_channels.
BIT_PARAM_TABLE = [
    ("bit_r50x1", 10, 23_513_162, "issue: bit_r50x1 ~ 23.5M at 10 classes; timm resnetv2_50x1_bit 23,520,842 - 7,680"),
    ("bit_r50x1", 100, 23_697_572, "timm resnetv2_50x1_bit 23,705,252 - 7,680"),
    ("bit_r101x1", 10, 42_505_290, "timm resnetv2_101x1_bit 42,512,970 - 7,680"),
    ("bit_r101x1", 100, 42_689_700, "timm resnetv2_101x1_bit 42,697,380 - 7,680"),
    ("bit_r50x3", 10, 211_212_490, "timm resnetv2_50x3_bit 211,235,530 - 23,040"),
    ("bit_r50x3", 100, 211_765_540, "timm resnetv2_50x3_bit 211,788,580 - 23,040"),
    ("bit_r152x2", 10, 232_263_818, "timm resnetv2_152x2_bit 232,279,178 - 15,360"),
    ("bit_r152x2", 100, 232_632_548, "timm resnetv2_152x2_bit 232,647,908 - 15,360"),
]

GOOGLENET_KUANGLIU = "kuangliu/pytorch-cifar models/googlenet.py"
INCEPTION_WEIAICUNZAI = "weiaicunzai/pytorch-cifar100 models/{} (README results table: {})"

# (variant, classes, exact params, published rounded figure in millions or None, source)
INCEPTION_PARAM_TABLE = [
    ("googlenet", 10, 6_166_250, 6.17, f"{GOOGLENET_KUANGLIU}; 6.17M as quoted (the repo's README lists accuracies only)"),
    ("googlenet", 100, 6_258_500, None, GOOGLENET_KUANGLIU),
    ("inception_v3", 100, 22_318_148, 22.3, INCEPTION_WEIAICUNZAI.format("inceptionv3.py", "inceptionv3 22.3M")),
    ("inception_v3", 10, 22_133_738, None, INCEPTION_WEIAICUNZAI.format("inceptionv3.py", "100 classes only")),
    ("inception_v4", 100, 41_296_516, 41.3, INCEPTION_WEIAICUNZAI.format("inceptionv4.py", "inceptionv4 41.3M")),
    ("inception_v4", 10, 41_158_186, None, INCEPTION_WEIAICUNZAI.format("inceptionv4.py", "100 classes only")),
    ("inception_resnet_v2", 100, 65_442_072, 65.4, INCEPTION_WEIAICUNZAI.format("inceptionv4.py", "inceptionresnetv2 65.4M")),
    ("inception_resnet_v2", 10, 65_257_662, None, INCEPTION_WEIAICUNZAI.format("inceptionv4.py", "100 classes only")),
]
