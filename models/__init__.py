"""Flax NNX ports of Llama and Mistral that run on kvjax's cache, plus weight loading."""

from models.config import ModelConfig, RopeScaling
from models.decoder import Decoder
from models.load import default_dtype, load, save
from models.sharding import make_mesh, parse_mesh

__all__ = ["Decoder", "ModelConfig", "RopeScaling", "default_dtype", "load", "make_mesh", "parse_mesh",
           "save"]
