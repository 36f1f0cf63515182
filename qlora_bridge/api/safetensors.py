"""Tensor-at-a-time safetensors reading and writing for exporters, with memory flat in model size (imports torch).

    for name, info in SafetensorsReader(shard).tensors.items(): ...
"""

from ..safetensors_io import SafetensorsReader, ShardWriter, model_shards

__all__ = ["SafetensorsReader", "ShardWriter", "model_shards"]
