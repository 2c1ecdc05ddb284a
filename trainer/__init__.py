"""longhorn-zoo: sequence mixers as pluggy plugins, trained by one generic FSDP2 trainer.

The plugin API, stable across releases, is the names below::

    from longhorn_zoo import MixerArgs, MixerSpec, define_scan_op, hookimpl

``longhorn_zoo.hookspecs`` documents the whole contract; ``longhorn_zoo.ops`` the scan ops.
"""

from longhorn_zoo.hookspecs import MixerArgs, MixerSpec, hookimpl
from longhorn_zoo.ops import Backend, ExampleInputs, ScanOp, define_scan_op

__all__ = ["Backend", "ExampleInputs", "MixerArgs", "MixerSpec", "ScanOp", "define_scan_op", "hookimpl"]
