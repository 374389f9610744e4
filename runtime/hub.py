"""Hugging Face hub names: what a repo id looks like, the presets' public checkpoints, the default Mimi."""
import re

# "owner/name", each part starting with a letter, digit or underscore as the hub requires, so that
# a relative path such as "./ckpt" or "../ckpt" is never taken for a repo id.
HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")

# Presets that name a public checkpoint; others need a local path or random weights.
PRESET_HUB_IDS = {"csm-1b": "sesame/csm-1b"}
# Mimi for a real checkpoint that bundles none (transformers' CSM checkpoints bundle theirs).
DEFAULT_CODEC = "kyutai/moshiko-pytorch-bf16"
