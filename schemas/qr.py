"""QR images of the platform's codes (segno) and reading them back (zxing-cpp).

The codes are Base45 text, which is exactly QR's alphanumeric alphabet: segno
picks alphanumeric mode by itself (5.5 bits a character instead of 8). Error
level Q (25% of the symbol may be damaged), as HCERT §4 recommends for
printed and phone-screen codes.
"""

from __future__ import annotations

import io
from pathlib import Path

import segno

ERROR_LEVEL = "q"


def _symbol(text: str) -> segno.QRCode:
    return segno.make_qr(text, error=ERROR_LEVEL, boost_error=False)


def png(text: str, scale: int = 4) -> bytes:
    buf = io.BytesIO()
    _symbol(text).save(buf, kind="png", scale=scale, border=4)
    return buf.getvalue()


def svg(text: str, scale: int = 4) -> str:
    buf = io.BytesIO()
    _symbol(text).save(buf, kind="svg", scale=scale, border=4, xmldecl=False, svgns=True)
    return buf.getvalue().decode()


def described_png(text: str, scale: int = 4) -> tuple[dict, bytes]:
    """(its QR version, mode, error level and length: how big the printed code is; the PNG), one symbol made."""
    symbol = _symbol(text)
    buf = io.BytesIO()
    symbol.save(buf, kind="png", scale=scale, border=4)
    about = {"version": symbol.version, "mode": symbol.mode, "error": symbol.error, "characters": len(text)}
    return about, buf.getvalue()


def read(image: Path | bytes) -> list[str]:
    """The text of every QR code in an image file (PNG, JPEG, …)."""
    import zxingcpp  # a native wheel: imported by the verifier and tests only, not by every API process
    from PIL import Image

    source = io.BytesIO(image) if isinstance(image, bytes) else image
    with Image.open(source) as img:
        return [r.text for r in zxingcpp.read_barcodes(img.convert("L")) if r.format == zxingcpp.BarcodeFormat.QRCode]
