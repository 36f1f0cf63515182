"""The built-in plugins: exporters, serving adapters and smoke checks.

Ordinary plugin modules: the plugin host imports them by name, as it imports an installed plugin's entry point,
and they use only the public plugin API (qlora_bridge.api) that an in-house plugin gets.
"""

# in registration order: where two backends serve one format, the first is the default
DEFAULT_PLUGINS = ("gguf", "gptq_awq", "llamacpp_server", "safetensors_export", "smoke_checks", "vllm_server")
