"""longhorn-zoo models in ``transformers``: ``import longhorn_zoo.hf`` registers them with the Auto classes.

After the import, ``AutoConfig`` and ``AutoModelForCausalLM.from_pretrained(folder)`` load a
folder written by ``python -m longhorn_zoo.export`` (see docs/interop.md)::

    import longhorn_zoo.hf  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained("exported/")
    tokenizer = AutoTokenizer.from_pretrained("exported/")

Without the import, ``from_pretrained(folder, trust_remote_code=True)`` finds the same classes
through the shims the export writes into the folder. Needs the ``hf`` extra.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from longhorn_zoo.hf.configuration import LonghornZooConfig
from longhorn_zoo.hf.modeling import LonghornZooForCausalLM, RecurrentState

AutoConfig.register(LonghornZooConfig.model_type, LonghornZooConfig, exist_ok=True)
AutoModelForCausalLM.register(LonghornZooConfig, LonghornZooForCausalLM, exist_ok=True)

__all__ = ["LonghornZooConfig", "LonghornZooForCausalLM", "RecurrentState"]
