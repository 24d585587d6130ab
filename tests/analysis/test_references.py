"""analysis/references.py: every published number names its exact source, and one measured on another network
says so, in the table's reference and in the figure legend."""
from __future__ import annotations

import re

import pandas as pd

from analysis.aggregate import aggregate_runs, match_references
from analysis.figures import accuracy_figure
from analysis.references import CITATIONS, NO_TRANSITION_RELU, REFERENCES
from experiments.names import EVAL_SECONDS, FINAL_TEST_ACC, FLOPS, MODEL_PARAM_PREFIX, PARAM_COUNT, TRAIN_SECONDS

CIFAR100_REPO = "weiaicunzai/pytorch-cifar100 README.md"


def test_every_source_is_a_paper_table_or_a_readme_at_a_commit() -> None:
    for source, citation in CITATIONS.items():
        assert re.search(r"\bTable \d+\b", citation) or re.search(r"\bcommits? [0-9a-f]{7,40}\b", citation), source
    assert {r.source for r in REFERENCES} <= set(CITATIONS)


def test_numbers_from_other_networks_carry_a_note_or_are_left_out() -> None:
    cifar100_repo = {r.arch: r for r in REFERENCES if r.source == CIFAR100_REPO}
    # Its DenseNets' transitions have no ReLU: kept, with that said.
    assert {a: cifar100_repo[a].note for a in ("densenet121", "densenet161", "densenet201")} == dict.fromkeys(
        ("densenet121", "densenet161", "densenet201"), NO_TRANSITION_RELU)
    # Its GoogLeNet (Dropout2d before the classifier, eps = channels in nine BatchNorms, a stem that changed
    # between commits) is not the zoo's kuangliu GoogLeNet: left out.
    assert "googlenet" not in cifar100_repo
    assert all(not r.note for a, r in cifar100_repo.items() if not a.startswith("densenet"))


def _agg(rows: list[tuple[str, str, int, dict]]) -> pd.DataFrame:
    """``aggregate_runs`` of two finished seeds per (arch, dataset, params, hyperparameters) row."""
    runs = pd.DataFrame([
        {"run_id": f"{arch}-{seed}", "arch": arch, "family": "densenet" if arch.startswith("densenet") else "resnet",
         "dataset": dataset, "recipe": "standard", "recipe_hash": "a" * 12, "recipe_protocol": "standard",
         "seed": seed, "epochs": 3, "val_size": 5000, "diverged": None, PARAM_COUNT: params, FLOPS: 1e8,
         FINAL_TEST_ACC: 76.0 + seed, TRAIN_SECONDS: 60.0, EVAL_SECONDS: 5.0,
         **{f"{MODEL_PARAM_PREFIX}{k}": v for k, v in hparams.items()}}
        for arch, dataset, params, hparams in rows for seed in (0, 1)])
    return aggregate_runs(runs)


def test_the_note_reaches_the_table_reference_and_the_figure_legend() -> None:
    agg = _agg([("densenet121", "cifar100", 7_048_548, {"growth_rate": 32}),
                ("resnet18", "cifar100", 11_220_132, {})])
    matched = match_references(agg)
    # The report shows each model's first-priority reference with its note.
    primary = matched.drop_duplicates("model_id").set_index("arch")
    assert (primary.loc["densenet121", "ref_source"], primary.loc["densenet121", "ref_note"]) == (
        CIFAR100_REPO, NO_TRANSITION_RELU)
    assert (primary.loc["resnet18", "ref_source"], primary.loc["resnet18", "ref_note"]) == (CIFAR100_REPO, "")

    legend = [t.get_text() for t in accuracy_figure(agg, matched, "params").legends[0].get_texts()]
    published = legend[legend.index("published (hollow)") + 1:]
    # The source, then its note once (wrapped as text), even though only one of its two numbers has it.
    assert published[0] == CIFAR100_REPO
    assert " ".join(published[1].split()) == f"– {NO_TRANSITION_RELU}"
    assert sum(NO_TRANSITION_RELU.split()[-1] in text for text in published) == 1


def test_a_source_without_notes_has_no_note_lines() -> None:
    agg = _agg([("resnet18", "cifar100", 11_220_132, {})])
    legend = [t.get_text() for t in accuracy_figure(agg, match_references(agg), "params").legends[0].get_texts()]
    published = legend[legend.index("published (hollow)") + 1:]
    assert published == [CIFAR100_REPO, "gap to ours"]
