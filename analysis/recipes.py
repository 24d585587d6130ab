"""Recipes as the runs record them: the label and protocol that name one, ``--recipe`` resolution, and the
rule that runs of different recipes never share a figure or table unless asked.

A recipe's name does not identify it (an override changes the hash, not the name), so every figure title
and table names a recipe by name, hash and protocol: ``fast (0123456789ab): 3 epochs, batch 128, ...``.
"""
from __future__ import annotations

import pandas as pd

from analysis.errors import AnalysisError, MixedRecipesError
from experiments.names import RECIPE_PARAM_PREFIX

# recipe.* fields the protocol always shows (from the run's own params), left out of its differences.
SHOWN_FIELDS = tuple(f"{RECIPE_PARAM_PREFIX}{f}" for f in ("epochs", "batch_size", "val_size", "subset", "max_steps"))


def recipe_label(recipe: object, recipe_hash: object) -> str:
    """``standard (0123456789ab)``: what every figure panel and table row names a recipe by."""
    return f"{recipe} ({recipe_hash})"


def _count(value: object, unit: str) -> str | None:
    return None if pd.isna(value) else f"{int(value):,} {unit}"


def _core_protocol(run: pd.Series) -> list[str]:
    subset = "" if pd.isna(run.get(f"{RECIPE_PARAM_PREFIX}subset")) else " (subset)"
    train, val = _count(run.get("train_size"), f"train{subset}"), _count(run.get("val_size"), "val images")
    parts = [_count(run.get("epochs"), "epochs"), None if pd.isna(run.get("batch_size")) else
             f"batch {run['batch_size']}", " / ".join(p for p in (train, val) if p) or None,
             _count(run.get(f"{RECIPE_PARAM_PREFIX}max_steps"), "steps at most")]
    return [p for p in parts if p]


def recipe_protocols(runs: pd.DataFrame) -> pd.Series:
    """Per run, what makes its numbers what they are: epochs, batch, train / val images (subset or not),
    a step cap, and every other ``recipe.*`` field on which the hashes that share its recipe name differ."""
    fields = [c for c in runs.columns if c.startswith(RECIPE_PARAM_PREFIX) and c not in SHOWN_FIELDS]
    firsts = runs.dropna(subset=["recipe_hash"]).drop_duplicates("recipe_hash")
    differing = {name: [c for c in fields if group[c].astype(str).nunique() > 1]
                 for name, group in firsts.groupby("recipe")}

    def protocol(run: pd.Series) -> str:
        extra = [f"{c.removeprefix(RECIPE_PARAM_PREFIX)}={run[c]}" for c in differing.get(run["recipe"], [])]
        return ", ".join(_core_protocol(run) + extra)

    return runs.apply(protocol, axis=1).astype(object) if len(runs) else pd.Series(dtype=object)


def recipe_title(label: str, protocol: object) -> str:
    """``fast (0123456789ab): 3 epochs, batch 128, ...`` (the label alone when nothing is known)."""
    return f"{label}: {protocol}" if isinstance(protocol, str) and protocol else label


def recipe_list(runs: pd.DataFrame) -> str:
    """The recipes of ``runs``, one per hash: ``name (hash): N runs (protocol)``, separated by "; "."""
    if runs.empty:
        return "none"
    rows = runs.assign(_protocol=recipe_protocols(runs)).groupby(["recipe", "recipe_hash"], dropna=False)
    return "; ".join(f"{recipe_label(name, h)}: {len(group)} runs ({group['_protocol'].iloc[0]})"
                     for (name, h), group in rows)


def resolve_recipe(runs: pd.DataFrame, recipe: str) -> str:
    """The hash ``--recipe`` means: a recipe hash of ``runs``, or a name that exactly one of their hashes
    carries; otherwise an error listing the candidates with their protocols."""
    if recipe in set(runs["recipe_hash"].dropna()):
        return recipe
    named = runs[runs["recipe"] == recipe]
    hashes = named["recipe_hash"].dropna().unique()
    if len(hashes) == 1:
        return str(hashes[0])
    if not len(hashes):
        raise AnalysisError(f"no FINISHED runs with recipe name or hash {recipe!r}; recipes present: "
                            f"{recipe_list(runs)}")
    raise AnalysisError(f"recipe name {recipe!r} names {len(hashes)} recipes (an override changes the hash, "
                        f"not the name); pass one hash with --recipe: {recipe_list(named)}")


def select_recipes(runs: pd.DataFrame, allow_mixed: bool = False) -> pd.DataFrame:
    """``runs``, unless they mix recipe hashes and ``allow_mixed`` is false (figures then get one panel per
    recipe): then raises ``MixedRecipesError``, listing the recipes found. ``--recipe`` is applied
    before, with ``resolve_recipe``, so that the missing-metrics report covers that recipe only."""
    if runs["recipe_hash"].nunique() > 1 and not allow_mixed:
        raise MixedRecipesError(
            f"runs of {runs['recipe_hash'].nunique()} different recipes found ({recipe_list(runs)}); "
            f"choose one with --recipe NAME_OR_HASH, or pass --allow-mixed-recipes to facet by recipe")
    return runs


def filter_recipe(runs: pd.DataFrame, recipe: str | None, finished: pd.DataFrame) -> pd.DataFrame:
    """The ``runs`` of the recipe that ``recipe`` names among the FINISHED runs ``finished`` (``resolve_recipe``);
    all of them when ``recipe`` is None."""
    return runs if recipe is None else runs[runs["recipe_hash"] == resolve_recipe(finished, recipe)]
