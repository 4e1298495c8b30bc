"""fiberbench: what is a vision model blind to?

Sample the fibers (invariant sets) of a feature extractor with a pretrained
diffusion / flow-matching prior, then say in CLIP space what changed.

Quick API::

    import fiberbench as fb
    prior = fb.load_prior("toy/prior-fm")
    f = fb.load_extractor("toy/shape-resnet@logits")
    ref = fb.toy.render(fb.toy.sample_factors(1, seed=0))
    result = fb.sample_fiber(prior, f, ref, n=8, preset="toy")
    result.to_frame()
"""
__version__ = "0.1.0"

from . import io, toy  # noqa: F401,E402
from .errors import ConfigError, InputError  # noqa: F401,E402
from .zoo import list_models, load_clip, load_extractor, load_prior, parse_spec  # noqa: F401,E402


def __getattr__(name):  # lazy: keep `import fiberbench` light
    if name in ("sample_fiber", "FiberResult", "PRESETS", "METHODS"):
        from . import sampling
        return getattr(sampling, name)
    raise AttributeError(f"module 'fiberbench' has no attribute {name!r}")
