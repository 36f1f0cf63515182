"""qlora-bridge: a QLoRA fine-tune all the way to a verified, signed release."""

__version__ = "0.1.0"
