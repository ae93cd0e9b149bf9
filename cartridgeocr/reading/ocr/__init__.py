"""OCR backends behind one interface (`base.OcrEngine`); each imports its engine lazily."""

from cartridgeocr.reading.ocr.base import OcrEngine, OcrUnavailable, TextPiece

#: The engine a reader uses unless told otherwise (predict, eval, the served model): PP-OCRv6
#: small reads about half as many tokens again as RapidOCR's PP-OCRv4 on real headstamps.
DEFAULT_OCR = "ppocr"

__all__ = ["DEFAULT_OCR", "OcrEngine", "OcrUnavailable", "TextPiece"]
