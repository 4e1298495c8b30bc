"""One module per model source; importing each registers it (``@register_source``).

A new source is one new module here with a :class:`~fiberbench.models.registry.ModelSource` subclass,
plus its line below.
"""
# isort: off
# registration; this order is the order sources are listed in (toy first)
from . import toy, timm, open_clip, hf, torch_module, diffusers, mix  # noqa: F401
from . import guided_diffusion  # noqa: F401
# isort: on
