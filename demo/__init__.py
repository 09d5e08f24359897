"""The embedded demo model: "shapes world" data, its evaluator and the trained two-expert model.

Torch-free: the world renders with numpy and Pillow; the evaluator parses images with numpy and
scipy. The training recipe lives in ``recipes/shapes_demo`` (torch, the ``train`` extra).
"""
