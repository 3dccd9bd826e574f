"""The methods `train.py` and `eval.py` can run, by the name ``method.name`` gives (conf/method/).

``single_stage`` trains one `RetrievalModule` (baseline, AREIR); ``irgen`` is IRGen's tokenizer -> generator
pipeline. A method of your own needs no edit here: ``method.name=my_package.my_module.MY_METHOD`` names an
`irlab.method.Method` object by its import path.
"""

from __future__ import annotations

import importlib

from datamodules.errors import UserInputError
from irgen.pipeline import IRGEN
from irlab.method import Method
from irlab.single_stage import SINGLE_STAGE

METHODS: dict[str, Method] = {m.name: m for m in (SINGLE_STAGE, IRGEN)}


def method_named(name: str) -> Method:
    """The registered method `name`, or the `Method` object at the import path `name`."""
    if name in METHODS:
        return METHODS[name]
    module_name, _, attribute = name.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attribute) if module_name else None
    except (ImportError, AttributeError):
        found = None
    if not isinstance(found, Method):
        raise UserInputError(f"method.name={name}: not a method. Use one of {sorted(METHODS)} or the import path "
                             f"of an irlab.method.Method object (my_package.my_module.MY_METHOD)")
    return found
