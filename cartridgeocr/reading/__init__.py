"""Reading a headstamp: detections -> cartridges -> unrolled strips -> text.

`postprocess` pairs casings and primers, `unroll` maps the stamped ring to a strip, `ocr/`
holds the OCR backends, `text` normalises and matches tokens against the lexicon, and
`pipeline.Reader` runs the whole photo -> cartridges-with-text path that the predict CLI, the
evaluation and the served model share.
"""
