"""Stand-in ``tensorrt_llm.llmapi``: the config classes the JSON places in this module."""

from .. import _surface

globals().update(
    {name: getattr(_surface, name) for name, home in _surface.HOMES.items() if home == __name__}
)
