"""Imports every built-in method module so that their ``@register`` lines run.

Adding a method = adding its module under ``pipeline/methods/`` and one import line here.
"""

from pipeline.methods import ewc, lora, modalprompt, multitask, zeroshot  # noqa: F401
