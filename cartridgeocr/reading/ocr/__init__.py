"""OCR backends behind one interface (`base.OcrEngine`); each imports its engine lazily."""

from cartridgeocr.reading.ocr.base import OcrEngine, OcrUnavailable, TextPiece

__all__ = ["OcrEngine", "OcrUnavailable", "TextPiece"]
