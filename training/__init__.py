"""prefloop training, the leaf package: offline (SFT, reward models, the DPO family, KTO) and
online (GRPO, rejection sampling, online DPO, PPO) training, imported by the layers above and
importing none of them.

Import-light on purpose: nothing here imports torch or transformers; import the submodules
(`training.trainer`, `training.online`, `training.ppo`, `training.models`, ...) where they are
needed.

    python -c "import training.trainer as t; help(t.train_from_cli)"
"""
