"""``python -m mlx_diffgemma.edit``: rewrite spans of a file in place.

The library's editing is ``infill.edit`` / ``infill.stream_edit``; the
command line is ``cli.edit``.
"""
