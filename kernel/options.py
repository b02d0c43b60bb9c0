"""The model and sampling options the kernel and the magics share, as traitlets: the
kernelspec's argv (`--CodeGenKernel.model=...`), IPython's config (`c.CodeGenMagics.top_p`) and
`%codegen_config` set them. None leaves the option to the user's config.toml, then the default."""

from __future__ import annotations

from traitlets import Float, HasTraits, Integer, Unicode


class ModelOptions(HasTraits):
    """Mixed into CodeGenKernel and CodeGenMagics (each keeps its own config section)."""

    model = Unicode(None, allow_none=True, help="Checkpoint folder or hub id.").tag(config=True)
    server = Unicode(None, allow_none=True, help="Decoder server URL.").tag(config=True)
    api_key = Unicode(
        None, allow_none=True, help="The decoder server's API key (default: $CODEGEN_API_KEY)."
    ).tag(config=True)
    dtype = Unicode(None, allow_none=True, help="float32, bfloat16 or float16.").tag(config=True)
    temperature = Float(None, allow_none=True, help="0 = greedy.").tag(config=True)
    top_p = Float(None, allow_none=True, help="Nucleus sampling mass.").tag(config=True)
    max_new_tokens = Integer(None, allow_none=True, help="Most tokens per step.").tag(config=True)
    prefix = Unicode(None, allow_none=True, help="Text before the first turn.").tag(config=True)
