"""``python -m mlx_diffgemma.lora``: fine-tuning, in mlx_lm.lora's manner.

The trainer is the ``tuner`` package; the command line is ``cli.lora``.
"""
