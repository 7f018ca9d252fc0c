"""Recipes: YAML pipelines of the subcommands' steps, run by ``peftcli run RECIPE``.

``recipe`` reads a recipe (YAML, overrides, variables, the workdir) into a ``Plan`` of
steps; ``steps`` is the table mapping each step kind onto its options classes and Python API call;
``prepare`` makes the built-in model and data sets a recipe may ask for. The format is in
``recipe``'s docstring and ``recipes/README.md``.
"""

from peftcli.recipes.recipe import Plan, PlannedStep, apply_overrides, execute, load, plan

__all__ = ["Plan", "PlannedStep", "apply_overrides", "execute", "load", "plan"]
