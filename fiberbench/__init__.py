"""fiberbench: what is a vision model blind to?

Sample the fibers (invariant sets) of a feature extractor with a pretrained
diffusion / flow-matching prior, then say in CLIP space what changed.

Quick API::

    import fiberbench as fb
    prior = fb.load_prior("toy/prior-fm")
    f = fb.load_extractor("toy/shape-resnet@logits")
    ref = fb.toy.render(fb.toy.sample_factors(1, seed=0))
    result = fb.sample_fiber(prior, f, ref, n=8)
    result.to_frame()

The package is layered (see ``docs/design.md``): ``models`` and ``toy`` at the bottom, ``sampling`` on
them, then ``analysis`` / ``baselines``, then ``bench`` / ``runs`` / ``training``, then ``ui`` and the CLI.
"""
from . import baselines, io, toy  # baselines: registers the trained baseline's sampler (method='conditional')
from .errors import ConfigError, InputError
from .models import list_models, load_clip, load_extractor, load_prior, parse_spec
from .sampling import METHODS, PRESETS, FiberResult, sample_fiber
from .version import __version__

__all__ = ["ConfigError", "FiberResult", "InputError", "METHODS", "PRESETS", "__version__", "baselines", "io",
           "list_models", "load_clip", "load_extractor", "load_prior", "parse_spec", "sample_fiber", "toy"]
