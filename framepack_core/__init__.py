"""FramePack engine in pure PyTorch: transformer, loading, packing, sampling, section loop, decoding.

Nothing in this package imports ComfyUI; the node pack in ``nodes/`` is a thin layer on top of it.
"""
