"""prefloop training: offline preference algorithms (SFT, reward models, the DPO family, KTO).

Import-light on purpose: nothing here imports torch or transformers; import the submodules
(`training.trainer`, `training.losses`, `training.models`, ...) where they are needed.
"""
