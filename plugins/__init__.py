"""Built-in longhorn-zoo plugins. Each subpackage registers through the ``longhorn_zoo.mixers`` entry points."""
