"""Continual methods. A method is one module here (or a plugin file named in ``method.plugins``)
registered with ``@register``; the lines below import the built-in ones, one line per method."""

from pipeline.methods import coda_prompt  # noqa: F401
from pipeline.methods import drape  # noqa: F401
from pipeline.methods import dualprompt  # noqa: F401
from pipeline.methods import ewc  # noqa: F401
from pipeline.methods import l2p  # noqa: F401
from pipeline.methods import lora  # noqa: F401
from pipeline.methods import lwf  # noqa: F401
from pipeline.methods import modalprompt  # noqa: F401
from pipeline.methods import moelora  # noqa: F401
from pipeline.methods import multitask  # noqa: F401
from pipeline.methods import proglora  # noqa: F401
from pipeline.methods import zeroshot  # noqa: F401
