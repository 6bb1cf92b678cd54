"""The cli layer: click commands that turn arguments into calls of the layers below (main.py).
Nothing imports it; it may import every other layer."""
