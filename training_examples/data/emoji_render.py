# Copyright 2025 The diffusers-snapgen authors. Apache-2.0.
"""Rasterising one iconify icon onto a white square, with either of two SVG renderers:

- ``resvg`` (PyPI ``resvg-py``: one self-contained abi3 manylinux wheel, no system libraries; ~2x faster), used where
  the training runs (the wheel travels in the offline bundle, see ``pack_emoji.py``);
- ``cairosvg`` (PyPI ``cairosvg`` + the system ``libcairo2``), the original renderer.

Both draw the same SVG document at the same size; README.md next to this file gives the measured difference.
"""

from __future__ import annotations

import io

RENDERERS = ("resvg", "cairosvg")


def available_renderer(preferred: str = "auto") -> str:
    """``preferred`` when importable (``auto``: resvg, else cairosvg); ValueError naming the missing package."""
    if preferred not in RENDERERS + ("auto",):
        raise ValueError(f"--renderer must be one of auto, {', '.join(RENDERERS)}; got {preferred!r}.")
    for name in RENDERERS if preferred == "auto" else (preferred,):
        try:
            __import__("resvg_py" if name == "resvg" else "cairosvg")
            return name
        except (ImportError, OSError):  # cairosvg raises OSError without libcairo
            continue
    raise ValueError(f"no SVG renderer: `pip install resvg-py` (self-contained) or `pip install cairosvg` "
                     f"(needs libcairo2); asked for {preferred!r}.")


def svg_document(icon, width: int, height: int) -> str:
    """The icon's body in an ``<svg>`` of ``width`` x ``height`` pixels over its view box."""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="{width}" '
            f'height="{height}" viewBox="{icon.left:g} {icon.top:g} {icon.width:g} {icon.height:g}">{icon.body}</svg>')


def _png(svg: str, renderer: str) -> bytes:
    if renderer == "resvg":
        import resvg_py

        return resvg_py.svg_to_bytes(svg_string=svg, skip_system_fonts=True)
    import cairosvg

    return cairosvg.svg2png(bytestring=svg.encode("utf-8"))


def render(icon, resolution: int, margin: float = 0.0, renderer: str = "cairosvg"):
    """The icon as an RGB ``PIL.Image`` of ``resolution`` squared, aspect kept, centred on white."""
    from PIL import Image

    inner = max(1, round(resolution * (1 - 2 * margin)))
    scale = inner / max(icon.width, icon.height)
    w, h = max(1, round(icon.width * scale)), max(1, round(icon.height * scale))
    rgba = Image.open(io.BytesIO(_png(svg_document(icon, w, h), renderer))).convert("RGBA")
    if icon.h_flip:
        rgba = rgba.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if icon.v_flip:
        rgba = rgba.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if icon.rotate:
        rgba = rgba.rotate(-90 * icon.rotate, expand=True)
    canvas = Image.new("RGBA", (resolution, resolution), (255, 255, 255, 255))
    canvas.alpha_composite(rgba, ((resolution - rgba.width) // 2, (resolution - rgba.height) // 2))
    return canvas.convert("RGB")
