"""Published CIFAR test accuracies, each with the exact place it was read.

Only numbers that could be cited precisely are here: every source is a paper table or a repository README
read at a commit (``CITATIONS``). Accuracies are in percent (100 - the published error where a source
reports error). ``hparams`` holds the model hyperparameters a reference is specific to: it matches a run
only when every one of them equals the run's ``model.<name>`` param. A ``note`` says how the published
number differs from what our run measures (the network it comes from, or the statistic); the report's table
and the figures' legends show it.

Repository READMEs were read at these commits (their tables may change later):
kuangliu/pytorch-cifar 0ed52b1 and 00166a3 (identical accuracy tables), weiaicunzai/pytorch-cifar100
01781f9, bearpaw/pytorch-classification 0c84465.

Kept with a note: weiaicunzai/pytorch-cifar100's DenseNet-121/161/201. Its ``models/densenet.py`` (read at
073c8bb and 46d2015) builds transitions BN-Conv(1x1)-AvgPool without the ReLU that ours, the paper's,
kuangliu's and bearpaw's have; the parameter count is the same, the function is not.

Left out on purpose:
- bearpaw's "ResNet-110" (6.11 % / 28.86 %) is a bottleneck network with projection shortcuts (its
  ``models/cifar/resnet.py`` switches to ``Bottleneck`` for depth >= 44), not He et al.'s basic-block
  ResNet-110 that the zoo's ``resnet110`` builds.
- weiaicunzai/pytorch-cifar100's GoogLeNet (21.97 % CIFAR-100 error): its ``models/googlenet.py`` (read at
  4169e85 and 49ddb26) adds Dropout2d(0.4) before the classifier and, through a typo
  (``nn.BatchNorm2d(n5x5, n5x5)``), gives the second BatchNorm of every Inception module's "5x5" branch an
  eps equal to its channel count (32 to 128), nine layers in all; its stem also differs between those
  commits (one unpadded 3x3 conv to 192 channels; three padded 3x3 convs 64-64-192 and a max-pool), and the
  README does not say which trained the number. The zoo's ``googlenet`` is kuangliu's, with none of this.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

HE_2016 = "He et al. 2016, Table 6"
HUANG_2017 = "Huang et al. 2017, Table 2"
KUANGLIU = "kuangliu/pytorch-cifar README.md"
CIFAR100_REPO = "weiaicunzai/pytorch-cifar100 README.md"
BEARPAW = "bearpaw/pytorch-classification README.md"
CITATIONS = {
    HE_2016: "K. He, X. Zhang, S. Ren, J. Sun, \"Deep Residual Learning for Image Recognition\", CVPR 2016, "
             "Table 6 (CIFAR-10 test error).",
    HUANG_2017: "G. Huang, Z. Liu, L. van der Maaten, K. Q. Weinberger, \"Densely Connected Convolutional "
                "Networks\", CVPR 2017, Table 2 (C10+ / C100+ error, standard augmentation).",
    KUANGLIU: "https://github.com/kuangliu/pytorch-cifar, README \"Accuracy\" table (CIFAR-10, commit 0ed52b1).",
    CIFAR100_REPO: "https://github.com/weiaicunzai/pytorch-cifar100, README \"Results\" table (CIFAR-100 top-1 "
                   "error, commit 01781f9).",
    BEARPAW: "https://github.com/bearpaw/pytorch-classification, README \"CIFAR\" table (top-1 error, "
             "commit 0c84465).",
}


@dataclass(frozen=True)
class Reference:
    arch: str
    dataset: str  # "cifar10" | "cifar100"
    test_acc: float  # percent
    source: str
    params_m: float | None = None  # as published, millions
    hparams: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def _err(arch: str, dataset: str, error: float, source: str, params_m: float | None = None, note: str = "",
         **hparams: Any) -> Reference:
    return Reference(arch, dataset, round(100.0 - error, 2), source, params_m, hparams, note)


# weiaicunzai/pytorch-cifar100 models/densenet.py Transition: BN-Conv-AvgPool (see the module docstring).
NO_TRANSITION_RELU = "its DenseNet transitions are BN-Conv(1x1)-AvgPool, without our ReLU"

# Order matters: where several references match one model, the first is the table's reference
# (papers before reference repositories); figures draw all of them.
REFERENCES: tuple[Reference, ...] = (
    # He et al. 2016, "Deep Residual Learning for Image Recognition", Table 6: CIFAR-10 test error,
    # identity (option A) shortcuts, standard augmentation.
    _err("resnet20", "cifar10", 8.75, HE_2016, 0.27, shortcut="A"),
    _err("resnet32", "cifar10", 7.51, HE_2016, 0.46, shortcut="A"),
    _err("resnet44", "cifar10", 7.17, HE_2016, 0.66, shortcut="A"),
    _err("resnet56", "cifar10", 6.97, HE_2016, 0.85, shortcut="A"),
    # The paper's 6.43 is the best of 5 runs; the mean is the fair match for our mean over seeds.
    _err("resnet110", "cifar10", 6.61, HE_2016, 1.7, "mean of 5 runs (±0.16); best run 93.57", shortcut="A"),
    _err("resnet1202", "cifar10", 7.93, HE_2016, 19.4, shortcut="A"),
    # Huang et al. 2017, "Densely Connected Convolutional Networks", Table 2: C10+ / C100+ error
    # (standard augmentation). DenseNet-BC means compression θ = 0.5.
    _err("densenet", "cifar10", 5.24, HUANG_2017, 1.0, depth=40, growth_rate=12),
    _err("densenet", "cifar100", 24.42, HUANG_2017, 1.0, depth=40, growth_rate=12),
    _err("densenet", "cifar10", 4.10, HUANG_2017, 7.0, depth=100, growth_rate=12),
    _err("densenet", "cifar100", 20.20, HUANG_2017, 7.0, depth=100, growth_rate=12),
    _err("densenet", "cifar10", 3.74, HUANG_2017, 27.2, depth=100, growth_rate=24),
    _err("densenet", "cifar100", 19.25, HUANG_2017, 27.2, depth=100, growth_rate=24),
    _err("densenet_bc", "cifar10", 4.51, HUANG_2017, 0.8, depth=100, growth_rate=12, compression=0.5),
    _err("densenet_bc", "cifar100", 22.27, HUANG_2017, 0.8, depth=100, growth_rate=12, compression=0.5),
    _err("densenet_bc", "cifar10", 3.62, HUANG_2017, 15.3, depth=250, growth_rate=24, compression=0.5),
    _err("densenet_bc", "cifar100", 17.60, HUANG_2017, 15.3, depth=250, growth_rate=24, compression=0.5),
    _err("densenet_bc", "cifar10", 3.46, HUANG_2017, 25.6, depth=190, growth_rate=40, compression=0.5),
    _err("densenet_bc", "cifar100", 17.18, HUANG_2017, 25.6, depth=190, growth_rate=40, compression=0.5),
    # kuangliu/pytorch-cifar, "Accuracy" table (CIFAR-10 accuracy). Its VGG puts BatchNorm after every
    # conv and ends in one Linear(512, 10) (models/vgg.py): the zoo's vgg16_bn with head="linear".
    Reference("vgg16_bn", "cifar10", 92.64, KUANGLIU, hparams={"head": "linear"}),
    Reference("resnet18", "cifar10", 93.02, KUANGLIU),
    Reference("resnet50", "cifar10", 93.62, KUANGLIU),
    Reference("densenet121", "cifar10", 95.04, KUANGLIU),
    # weiaicunzai/pytorch-cifar100, "Results" table (CIFAR-100 top-1 error, params as published).
    # Its VGGs end in the 4096-wide FC stack (models/vgg.py): the zoo's head="fc4096".
    _err("vgg11_bn", "cifar100", 31.36, CIFAR100_REPO, 28.5, head="fc4096"),
    _err("vgg13_bn", "cifar100", 28.00, CIFAR100_REPO, 28.7, head="fc4096"),
    _err("vgg16_bn", "cifar100", 27.07, CIFAR100_REPO, 34.0, head="fc4096"),
    _err("vgg19_bn", "cifar100", 27.77, CIFAR100_REPO, 39.0, head="fc4096"),
    _err("resnet18", "cifar100", 24.39, CIFAR100_REPO, 11.2),
    _err("resnet34", "cifar100", 23.24, CIFAR100_REPO, 21.3),
    _err("resnet50", "cifar100", 22.61, CIFAR100_REPO, 23.7),
    _err("densenet121", "cifar100", 22.99, CIFAR100_REPO, 7.0, NO_TRANSITION_RELU, growth_rate=32),
    _err("densenet161", "cifar100", 21.56, CIFAR100_REPO, 26.0, NO_TRANSITION_RELU, growth_rate=48),
    _err("densenet201", "cifar100", 21.46, CIFAR100_REPO, 18.0, NO_TRANSITION_RELU, growth_rate=32),
    _err("inception_v3", "cifar100", 22.81, CIFAR100_REPO, 22.3),
    _err("inception_v4", "cifar100", 24.14, CIFAR100_REPO, 41.3),
    _err("inception_resnet_v2", "cifar100", 27.51, CIFAR100_REPO, 65.4),
    # bearpaw/pytorch-classification, "CIFAR" table (top-1 error on CIFAR-10 / CIFAR-100, params
    # counted on CIFAR-10). Its VGG is kuangliu's (one linear layer).
    _err("alexnet", "cifar10", 22.78, BEARPAW, 2.47),
    _err("alexnet", "cifar100", 56.13, BEARPAW, 2.47),
    _err("vgg19_bn", "cifar10", 6.66, BEARPAW, 20.04, head="linear"),
    _err("vgg19_bn", "cifar100", 28.05, BEARPAW, 20.04, head="linear"),
    _err("densenet_bc", "cifar10", 4.54, BEARPAW, 0.77, depth=100, growth_rate=12, compression=0.5),
    _err("densenet_bc", "cifar100", 22.88, BEARPAW, 0.77, depth=100, growth_rate=12, compression=0.5),
    _err("densenet_bc", "cifar10", 3.32, BEARPAW, 25.62, depth=190, growth_rate=40, compression=0.5),
    _err("densenet_bc", "cifar100", 17.17, BEARPAW, 25.62, depth=190, growth_rate=40, compression=0.5),
)


def references_frame(references: tuple[Reference, ...] = REFERENCES) -> pd.DataFrame:
    """One row per reference, in priority order (``priority`` 0 is the most preferred)."""
    return pd.DataFrame({
        "priority": range(len(references)),
        "arch": [r.arch for r in references],
        "dataset": [r.dataset for r in references],
        "ref_test_acc": [r.test_acc for r in references],
        "ref_source": [r.source for r in references],
        "ref_params_m": [r.params_m for r in references],
        "ref_hparams": [r.hparams for r in references],
        "ref_note": [r.note for r in references],
    })
