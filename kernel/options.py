"""The model and sampling options the kernel and the magics share, as traitlets: the
kernelspec's argv (`--CodeGenKernel.model=...`), IPython's config (`c.CodeGenMagics.top_p`) and
`%codegen_config` set them. None leaves the option to the user's config.toml, then the default
(codegen_repl.core.settings.resolve decides)."""

from __future__ import annotations

from traitlets import Float, HasTraits, Integer, Unicode

from codegen_repl.core.settings import Overrides, Settings, resolve


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
    context_window = Integer(
        None, allow_none=True, help="A decoder server's context window, if it does not say."
    ).tag(config=True)

    def settings(self, can_ask: bool) -> Settings:
        """These options over config.toml over the defaults.

        Raises:
            ConfigError: an option or config.toml has a bad value (the message says which).
        """
        from codegen_repl.userconfig import UserConfig

        names = self.trait_names(config=True)
        given = Overrides.of({name: getattr(self, name) for name in names})
        return resolve(given, UserConfig.load().overrides(), can_ask=can_ask)
