"""Serving: the headstamp reader as an MLflow pyfunc model (`log`), defined in `reader_model`.

`reader_model.py` is an MLflow "model from code" file: MLflow executes it when the model is
loaded, so it is never imported by the rest of the package.
"""
