"""What a name must look like to be tried as a Hugging Face hub repo id (checkpoints, Mimi weights)."""
import re

# "owner/name", each part starting with a letter, digit or underscore as the hub requires, so that
# a relative path such as "./ckpt" or "../ckpt" is never taken for a repo id.
HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")
