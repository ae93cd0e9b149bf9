"""Text recognition trained in this framework: a small CRNN with CTC, read on unrolled strips.

``strips``: labelled strips unrolled from synthetic renders (cached); ``data``: the Lightning
data module; ``model``: the network and its Lightning module; ``decode``: greedy and beam CTC
decoding; ``train``: `train_recogniser(cfg)`, run by ``cartridgeocr-train-recogniser``.
"""
