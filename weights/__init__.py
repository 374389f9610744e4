"""Checkpoints: detect a folder's format, load it as a CSMModel, convert it to ours, or make
seeded random weights of any shape."""
from .convert import convert
from .formats import detect_format
from .load import load_model
from .random_init import random_model

__all__ = ["load_model", "convert", "random_model", "detect_format"]
