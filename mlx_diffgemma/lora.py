"""``python -m mlx_diffgemma.lora``: fine-tuning, in mlx_lm.lora's manner.

The trainer is the ``tuner`` package; the command line is ``cli.lora``.
"""

if __name__ == "__main__":
    import sys

    try:
        from .cli.lora import main
    except KeyboardInterrupt:  # Ctrl-C while the libraries load
        print("interrupted before training started; nothing was written", file=sys.stderr)
        sys.exit(130)
    main()
